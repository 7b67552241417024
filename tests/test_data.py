"""Data sources (formats, file kinds, errors, splits) and chat rendering (loss masks, EOS, prompt layout)."""

from __future__ import annotations

import copy
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.chat import IGNORE_INDEX, chat_prompt, render_example
from lmforge.data.sources import FORMATS, detect_format, load_records, split_records
from lmforge.errors import UserError
from lmforge.models.tiny import make_tiny_tokenizer

EOS_TEXT = "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_arrow_stream(path, rows):
    """An arrow *stream* file, the kind `datasets.save_to_disk` writes."""
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


# ---------------------------------------------------------------------------------------------- formats

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
]

DETECTION_CASES = [
    # id, row as written, expected normalised record (extra keys such as "id" are dropped)
    ("text", {"text": "the cat sat", "id": 1}, {"text": "the cat sat", "format": "text"}),
    (
        "prompt_completion",
        {"prompt": "2+2?", "completion": "4", "id": 2},
        {"prompt": "2+2?", "completion": "4", "format": "prompt_completion"},
    ),
    ("messages", {"messages": CHAT}, {"messages": CHAT, "format": "messages"}),
    (
        "alpaca_with_input",
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"prompt": "Translate to French.\n\ncat", "completion": "chat", "format": "alpaca"},
    ),
    (
        "alpaca_without_input",
        {"instruction": "Name a colour.", "output": "red"},
        {"prompt": "Name a colour.", "completion": "red", "format": "alpaca"},
    ),
    (
        "alpaca_empty_input",
        {"instruction": "Name a colour.", "input": "", "output": "red"},
        {"prompt": "Name a colour.", "completion": "red", "format": "alpaca"},
    ),
    (
        "preference",
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "format": "preference"},
    ),
]


@pytest.mark.parametrize("row, expected", [c[1:] for c in DETECTION_CASES], ids=[c[0] for c in DETECTION_CASES])
def test_detects_each_format_from_jsonl(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [row, row])
    assert load_records(path) == [expected, expected]


@pytest.mark.parametrize(
    "keys, fmt",
    [
        (["prompt", "chosen", "rejected", "completion"], "preference"),  # preference is checked first
        (["prompt", "completion", "text"], "prompt_completion"),  # before text
        (["instruction", "output", "prompt", "completion"], "alpaca"),
        (["messages", "text"], "messages"),
    ],
)
def test_detection_order(keys, fmt):
    assert detect_format(dict.fromkeys(keys, "x"), "here") == fmt


def test_detection_failure_names_keys_and_fix():
    with pytest.raises(UserError) as err:
        detect_format({"question": "q", "answer": "a"}, "data.jsonl:1")
    message = str(err.value)
    assert message.startswith("data.jsonl:1: ")
    assert "['answer', 'question']" in message and "--columns" in message
    assert all(fmt in message for fmt in FORMATS) and "\n" not in message


def test_forced_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p", "completion": "c", "text": "whole"}])
    assert load_records(path) == [{"prompt": "p", "completion": "c", "format": "prompt_completion"}]
    assert load_records(path, fmt="text") == [{"text": "whole", "format": "text"}]


@pytest.mark.parametrize(
    "row, columns, expected",
    [
        (
            {"question": "2+2?", "answer": "4"},
            {"prompt": "question", "completion": "answer"},
            {"prompt": "2+2?", "completion": "4", "format": "prompt_completion"},
        ),
        ({"body": "some words"}, {"text": "body"}, {"text": "some words", "format": "text"}),
        ({"conversation": CHAT}, {"messages": "conversation"}, {"messages": CHAT, "format": "messages"}),
        (  # the user's "prompt" key is a different field: mapping another key onto prompt wins
            {"prompt": "ignored", "q": "used", "completion": "c"},
            {"prompt": "q"},
            {"prompt": "used", "completion": "c", "format": "prompt_completion"},
        ),
    ],
    ids=["question_answer", "text", "messages", "overrides_existing_key"],
)
def test_columns_map_user_keys(tmp_path, row, columns, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    assert load_records(path, columns=columns) == [expected]


def test_unmapped_keys_fail_with_columns_hint(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(UserError, match="--columns") as err:
        load_records(path)
    assert f"{path}:1" in str(err.value)


# ------------------------------------------------------------------------------------------- file kinds

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "Say hi, politely", "completion": 'Hello, "friend".\nNice day.'},  # comma, quotes, newline
    {"prompt": "Café?", "completion": "Oui ☕"},
]
EXPECTED = [row | {"format": "prompt_completion"} for row in ROWS]


def _jsonl(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def _jsonl_with_bom_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\ufeff" + "\n\n".join(json.dumps(row) for row in ROWS) + "\n\n", encoding="utf-8")
    return path


def _json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    return path


def _json_data_key(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": ROWS, "version": 1}), encoding="utf-8")
    return path


def _csv(tmp_path, encoding="utf-8"):
    path = tmp_path / "data.csv"
    with open(path, "w", encoding=encoding, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    return path


def _csv_excel_bom(tmp_path):
    return _csv(tmp_path, encoding="utf-8-sig")


def _parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def _arrow_file(tmp_path):
    return write_arrow_stream(tmp_path / "data.arrow", ROWS)


def _datasets_folder(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    write_arrow_stream(folder / "data-00000-of-00002.arrow", ROWS[:2])
    write_arrow_stream(folder / "data-00001-of-00002.arrow", ROWS[2:])
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))  # metadata, not data
    (folder / "state.json").write_text(
        json.dumps(
            {"_data_files": [{"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}
        )
    )
    return folder


def _plain_folder(tmp_path):
    folder = tmp_path / "plain"
    (folder / "more").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", ROWS[:1])
    write_jsonl(folder / "more" / "b.jsonl", ROWS[1:])
    (folder / "README.md").write_text("not data")
    return folder


@pytest.mark.parametrize(
    "make",
    [
        _jsonl,
        _jsonl_with_bom_and_blank_lines,
        _json_list,
        _json_data_key,
        _csv,
        _csv_excel_bom,
        _parquet,
        _arrow_file,
        _datasets_folder,
        _plain_folder,
    ],
    ids=lambda make: make.__name__.strip("_"),
)
def test_every_file_kind_gives_the_same_records(tmp_path, make):
    assert load_records(make(tmp_path)) == EXPECTED


def test_parquet_nulls_in_alpaca_input_are_empty(tmp_path):
    path = tmp_path / "data.parquet"
    rows = [{"instruction": "A", "input": "x", "output": "1"}, {"instruction": "B", "input": None, "output": "2"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r["prompt"] for r in load_records(path)] == ["A\n\nx", "B"]


# ------------------------------------------------------------------------------------------- bad input

PC = json.dumps({"prompt": "p", "completion": "c"})

BAD_INPUT_CASES = [
    # id, file name ("/" suffix: a folder), content (None: not created), load_records kwargs, fragments
    ("missing_key", "d.jsonl", PC + '\n{"prompt": "p"}\n', {}, [":2:", "'completion'", "--columns completion="]),
    ("missing_key_after_blank_line", "d.jsonl", PC + '\n\n{"prompt": "p"}\n', {}, [":3:", "'completion'"]),
    ("undetectable_first_record", "d.jsonl", '{"q": "p", "a": "c"}\n', {}, [":1:", "['a', 'q']", "--columns"]),
    ("empty_jsonl", "d.jsonl", "", {}, ["is empty"]),
    ("blank_jsonl", "d.jsonl", "\n  \n", {}, ["is empty"]),
    ("blank_json", "d.json", " \n", {}, ["is empty"]),
    ("header_only_csv", "d.csv", "prompt,completion\n", {}, ["is empty"]),
    ("invalid_json_line", "d.jsonl", PC + '\n{"prompt": "p",\n', {}, [":2:", "invalid JSON", "column"]),
    ("invalid_json_file", "d.json", '[\n  {"prompt": "p"},\n  {oops}\n]', {}, ["invalid JSON", "line 3"]),
    ("line_not_an_object", "d.jsonl", "[1, 2]\n", {}, [":1:", "expected a JSON object, got list"]),
    ("json_record_not_an_object", "d.json", '[{"text": "a"}, 5]', {}, ["record 2", "not a JSON object"]),
    (
        "non_string_value",
        "d.jsonl",
        PC + '\n{"prompt": "p", "completion": 4}\n',
        {},
        [":2:", "'completion'", "must be a string", "int"],
    ),
    ("non_string_alpaca_input", "d.jsonl", '{"instruction": "i", "input": 3, "output": "o"}', {}, [":1:", "'input'"]),
    (
        "no_assistant_turn",
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        {},
        [":1:", "'messages'", "no assistant turn"],
    ),
    (
        "bad_role",
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
        {},
        [":1:", "messages[1]", "'bot'", "use system, user or assistant"],
    ),
    (
        "non_string_content",
        "d.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}),
        {},
        [":1:", "messages[1]", "'content'", "must be a string", "NoneType"],
    ),
    ("messages_not_a_list", "d.jsonl", '{"messages": "hi"}', {}, [":1:", "'messages'", "non-empty list"]),
    ("unknown_forced_format", "d.jsonl", PC, {"fmt": "chat"}, ["'chat'", *FORMATS]),
    ("wrong_format_flag", "d.jsonl", PC, {"fmt": "preference"}, [":1:", "missing key 'chosen'", "--columns chosen="]),
    ("unsupported_extension", "d.txt", "prompt: p", {}, ["unsupported data file", ".jsonl", ".parquet", "datasets"]),
    ("missing_path", "nope.jsonl", None, {}, ["not found", "check the path"]),
    ("empty_folder", "empty/", None, {}, ["holds no data files", "state.json"]),
    ("csv_unquoted_comma", "d.csv", "prompt,completion\nWhat is 2,3?,5\n", {}, [":2:", "3 fields", "header has 2"]),
    ("csv_missing_field", "d.csv", "prompt,completion\np,c\nonly\n", {}, [":3:", "1 fields", "header has 2"]),
    ("csv_field_too_large", "d.csv", "text\nshort\n" + "x" * 200_000 + "\n", {}, [":3:", "malformed CSV"]),
    ("not_utf8", "d.jsonl", b'{"text": "caf\xe9"}\n', {}, ["not UTF-8", "re-save"]),
    ("corrupt_parquet", "d.parquet", "not parquet at all", {}, ["cannot read", "parquet/arrow"]),
]


@pytest.mark.parametrize(
    "name, content, kwargs, fragments", [c[1:] for c in BAD_INPUT_CASES], ids=[c[0] for c in BAD_INPUT_CASES]
)
def test_bad_input_is_one_line_user_error_naming_the_place(tmp_path, name, content, kwargs, fragments):
    path = tmp_path / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_records(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    if "fmt" not in kwargs or kwargs["fmt"] in FORMATS:  # a bad flag is named, not the file
        assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_csv_error_line_counts_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"two\nlines",c\np\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv:4: 1 fields"):
        load_records(path)


# ---------------------------------------------------------------------------------------------- splits

RECORDS = [{"text": str(i)} for i in range(50)]


def test_split_is_deterministic_per_seed():
    assert split_records(RECORDS, 0.2, seed=1) == split_records(RECORDS, 0.2, seed=1)
    assert split_records(RECORDS, 0.2, seed=1)[1] != split_records(RECORDS, 0.2, seed=2)[1]


@pytest.mark.parametrize("seed", [0, 7])
def test_split_is_disjoint_and_covering(seed):
    train, val = split_records(RECORDS, 0.3, seed=seed)
    keys = [r["text"] for r in train + val]
    assert sorted(keys) == sorted(r["text"] for r in RECORDS)
    assert len(set(keys)) == len(RECORDS)


@pytest.mark.parametrize(
    "n, fraction, n_val",
    [
        (50, 0.1, 5),
        (50, 0.0, 0),
        (10, 0.01, 1),  # a positive fraction always validates on something
        (1, 0.5, 0),  # ...unless that would leave nothing to train on
        (10, 0.95, 9),  # rounding up to 10 would leave training empty
        (2, 0.75, 1),
        (0, 0.1, 0),
    ],
)
def test_split_sizes(n, fraction, n_val):
    train, val = split_records(list(range(n)), fraction)
    assert (len(train), len(val)) == (n - n_val, n_val)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(UserError, match="validation fraction must be in"):
        split_records(RECORDS, fraction)


# -------------------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The tiny tokenizer without a chat template: rendering falls back to plain concatenation."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


def trained_positions(example):
    return [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]


def trained_text(tokenizer, example):
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def runs(positions):
    """Group sorted positions into runs of consecutive integers."""
    groups = []
    for p in positions:
        if groups and groups[-1][-1] == p - 1:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


PROMPT, COMPLETION = "What is the capital of France?", " Paris, the city."


def test_prompt_completion_trains_only_completion_and_eos(tok):
    example = render_example(tok, {"prompt": PROMPT, "completion": COMPLETION})
    assert len(example.input_ids) == len(example.labels) and not example.truncated
    assert trained_text(tok, example) == COMPLETION + EOS_TEXT
    positions = trained_positions(example)
    assert len(runs(positions)) == 1
    for i in positions:
        assert example.labels[i] == example.input_ids[i]
    # The prompt is exactly what evaluation shows the model, and none of it is trained.
    prefix = encode(tok, chat_prompt(tok, PROMPT))
    assert example.input_ids[: len(prefix)] == prefix
    assert positions[0] == len(prefix)


def test_eos_is_a_trained_label_although_pad_is_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id
    example = render_example(tok, {"prompt": PROMPT, "completion": COMPLETION})
    last = trained_positions(example)[-1]
    assert example.labels[last] == example.input_ids[last] == tok.eos_token_id
    assert example.labels.count(tok.eos_token_id) == 1  # the user turn's EOS is prompt, not trained


def test_multi_turn_trains_both_assistant_turns_only(tok):
    messages = [
        {"role": "system", "content": "You answer tersely."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": "Second answer."},
    ]
    example = render_example(tok, {"messages": messages})
    assert tok.decode(example.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    turns = [tok.decode([example.labels[i] for i in run]) for run in runs(trained_positions(example))]
    assert turns == ["First answer." + EOS_TEXT, "Second answer." + EOS_TEXT]
    untrained = tok.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    )
    for message in messages[:2] + messages[3:4]:
        assert message["content"] in untrained
    assert "answer." not in untrained


@pytest.mark.parametrize("text", ["the cat sat on the mat", "ends with eos" + EOS_TEXT])
def test_text_trains_every_token_and_ends_with_one_eos(tok, text):
    example = render_example(tok, {"text": text})
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tok.eos_token_id
    assert example.input_ids.count(tok.eos_token_id) == 1
    assert tok.decode(example.input_ids) == text.removesuffix(EOS_TEXT) + EOS_TEXT


def test_train_on_prompt_trains_everything_on_the_same_ids(tok):
    record = {"prompt": PROMPT, "completion": COMPLETION}
    masked = render_example(tok, record)
    full = render_example(tok, record, train_on_prompt=True)
    assert full.labels == full.input_ids
    assert full.input_ids == masked.input_ids  # no second EOS appended after the template's newline
    assert full.input_ids.count(tok.eos_token_id) == 2  # end of the user turn and of the assistant turn


def test_max_length_truncates_and_flags(tok):
    record = {"prompt": PROMPT, "completion": COMPLETION}
    full = render_example(tok, record)
    cut = render_example(tok, record, max_length=10)
    assert cut.truncated and len(cut.input_ids) == len(cut.labels) == 10
    assert (cut.input_ids, cut.labels) == (full.input_ids[:10], full.labels[:10])
    exact = render_example(tok, record, max_length=len(full.input_ids))
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_no_chat_template_concatenates_and_trains_completion_and_eos(plain_tok):
    example = render_example(plain_tok, {"prompt": "What", "completion": "Paris"})
    assert plain_tok.decode(example.input_ids) == "What\nParis" + EOS_TEXT  # EOS right after the completion
    assert trained_text(plain_tok, example) == "Paris" + EOS_TEXT
    assert len(runs(trained_positions(example))) == 1
    prefix = encode(plain_tok, chat_prompt(plain_tok, "What"))
    assert example.input_ids[: len(prefix)] == prefix and trained_positions(example)[0] == len(prefix)


def test_no_chat_template_multi_turn(plain_tok):
    messages = [
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
        {"role": "assistant", "content": "A2"},
    ]
    example = render_example(plain_tok, {"messages": messages})
    assert plain_tok.decode(example.input_ids) == "U1\nA1\n\nU2\nA2" + EOS_TEXT
    turns = [plain_tok.decode([example.labels[i] for i in run]) for run in runs(trained_positions(example))]
    assert turns == ["A1", "A2" + EOS_TEXT]


def test_preference_record_is_refused(tok):
    with pytest.raises(UserError, match="preference records go to DPO"):
        render_example(tok, {"prompt": "p", "chosen": "a", "rejected": "b"})


# ---------------------------------------------------------------------------------------------- prompts

SHOTS = [("2+2?", "4"), ("3+3?", "6")]


def test_chat_prompt_puts_shots_as_earlier_turns(tok):
    rendered = chat_prompt(tok, "5+5?", SHOTS)
    assert rendered == (
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
        "<|im_start|>user\n5+5?<|im_end|>\n" + GENERATION_PROMPT
    )
    assert rendered.endswith(GENERATION_PROMPT)
    assert chat_prompt(tok, "5+5?") == "<|im_start|>user\n5+5?<|im_end|>\n" + GENERATION_PROMPT


def test_chat_prompt_without_template(plain_tok):
    assert chat_prompt(plain_tok, "5+5?", SHOTS) == "2+2?\n4\n\n3+3?\n6\n\n5+5?\n"


def test_datasetdict_folder_asks_for_one_split(tmp_path):
    (tmp_path / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as err:
        load_records(tmp_path)
    assert "pass one split folder" in str(err.value) and "train" in str(err.value)


def test_bad_state_json_is_named(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(UserError) as err:
        load_records(tmp_path)
    assert "state.json" in str(err.value) and "\n" not in str(err.value)


def test_plain_folder_skips_metadata_json(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "x"}')
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    assert [r["text"] for r in load_records(tmp_path)] == ["hello"]
