"""lm-eval task YAMLs over local files: each output type scored on a tiny model against hand computations,
prompts built as lm-eval builds them, the chat-template flag, and every bad input one line before the model loads.
"""

from __future__ import annotations

import json
import math
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from cli_helpers import run_cli as run_lmforge

from lmforge.errors import UserError
from lmforge.eval import scoring
from lmforge.eval.forgetting import EvalSettings
from lmforge.eval.lmeval_score import apply_filter, build_context, exact_match, shots_for
from lmforge.eval.lmeval_yaml import load_task
from lmforge.eval.run import evaluate
from lmforge.models.load import load_model


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_yaml(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


GSM = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 6 times 7?", "answer": "6 * 7 = 42\n#### 42"},
    {"question": "Half of 10?", "answer": "10 / 2 = 5\n#### 5"},
]


def gsm_yaml(tmp_path, data, **extra):
    config = {
        "task": "my_gsm",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer.split('####')[-1].strip()}}",
        "generation_kwargs": {"until": ["Question:", "\n\n"], "max_gen_toks": 8, "do_sample": False},
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}]},
            {
                "name": "first-word",
                "filter": [
                    {"function": "regex", "regex_pattern": r"(\S+)", "group_select": 0},
                    {"function": "take_first"},
                ],
            },
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    } | extra
    return write_yaml(tmp_path / "gsm.yaml", config)


def test_regex_filter_selects_matches_as_lm_eval_does():
    steps = [
        {
            "function": "regex",
            "compiled": re.compile(r"#### (\-?[0-9\.\,]+)"),
            "group_select": 0,
            "fallback": "[invalid]",
        }
    ]
    assert apply_filter(steps, "so 3 + 4 = 7\n#### 7 done") == "7"
    assert apply_filter(steps, "no marker here") == "[invalid]"
    last = [{"function": "regex", "compiled": re.compile(r"(\d+)"), "group_select": -1, "fallback": "x"}]
    assert apply_filter(last, "1 then 22 then 333") == "333"  # group_select indexes the matches, as lm-eval
    alternatives = [
        {"function": "regex", "compiled": re.compile(r"(-?\$\d+)|(-?\d+)"), "group_select": 0, "fallback": "x"}
    ]
    assert apply_filter(alternatives, "about 12 apples") == "12"  # first non-empty group of the match
    assert apply_filter([{"function": "remove_whitespace"}, {"function": "lowercase"}], "  Ab C ") == "ab c "


@pytest.mark.parametrize(
    ("prediction", "reference", "options", "expected"),
    [
        ("Hello, World!", "hello world", {}, 0.0),
        ("Hello, World!", "hello world", {"ignore_case": True}, 0.0),
        ("Hello, World!", "hello world", {"ignore_case": True, "ignore_punctuation": True}, 1.0),
        ("The answer is 42", "42", {"regexes_to_ignore": ["The answer is "]}, 1.0),
        ("42 apples", "42", {"regexes_to_ignore": [r"\s*apples"]}, 1.0),
        (" 42", "42", {}, 0.0),  # lm-eval's exact_match does not strip
        ("v2", "v3", {"ignore_numbers": True}, 1.0),
    ],
)
def test_exact_match_options_match_hand_computed_results(prediction, reference, options, expected):
    assert exact_match(prediction, reference, options) == expected


def test_generate_until_gsm8k_layout_with_regex_filters(tiny, tmp_path):
    prompts = [f"Question: {row['question']}\nAnswer:" for row in GSM]
    outputs = scoring.generate_until(tiny.model, tiny.tokenizer, prompts, ("Question:", "\n\n"), 8, 8)
    first_words = [(re.findall(r"(\S+)", out) or ["[invalid]"])[0] for out in outputs]
    # Two answers end in the word the model really says first, the third in one it cannot say.
    rows = [dict(GSM[0], answer=f"work\n#### {first_words[0]}"), dict(GSM[1], answer=f"work\n#### {first_words[1]}")]
    rows.append(dict(GSM[2], answer="work\n#### 99999"))
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    results = evaluate(tiny, [str(gsm_yaml(tmp_path, data))], footprint=False, batch_size=8)
    row = results["results"]["my_gsm"]
    assert row["exact_match,first-word"] == pytest.approx(2 / 3 if first_words[2] != "99999" else 1.0)
    strict = [float((re.findall(r"#### (\-?[0-9\.\,]+)", o) or ["[invalid]"])[0].strip() == t) for o, t in
              zip(outputs, [first_words[0], first_words[1], "99999"], strict=True)]  # fmt: skip
    assert row["exact_match,strict-match"] == pytest.approx(sum(strict) / 3)
    samples = results["samples"]["my_gsm"]
    assert [s["input"] for s in samples] == prompts
    assert [s["output"] for s in samples] == outputs
    assert results["configs"]["my_gsm"]["stop"] == ["Question:", "\n\n"]


def test_multiple_choice_on_csv_scores_like_lm_eval(tiny, tmp_path):
    data = tmp_path / "mc.csv"
    data.write_text(
        "question,A,B,C,label\nSky colour?,blue,green,red,0\nGrass?,pink,green,grey,1\nSnow?,black,tan,white,2\n"
    )
    task = write_yaml(
        tmp_path / "mc.yaml",
        {
            "task": "mc",
            "dataset_path": "csv",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_choice": "{{[A, B, C]}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
    )
    results = evaluate(tiny, [str(task)], footprint=False)
    rows = [("Sky colour?", ["blue", "green", "red"], 0), ("Grass?", ["pink", "green", "grey"], 1)]
    rows.append(("Snow?", ["black", "tan", "white"], 2))
    acc, acc_norm = [], []
    for question, choices, gold in rows:
        lls = [
            ll
            for ll, _ in scoring.loglikelihood(
                tiny.model, tiny.tokenizer, [(f"Q: {question}\nA:", " " + c) for c in choices]
            )
        ]
        acc.append(float(lls.index(max(lls)) == gold))
        normed = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        acc_norm.append(float(normed.index(max(normed)) == gold))
    row = results["results"]["mc"]
    assert row["acc,none"] == pytest.approx(sum(acc) / 3)
    assert row["acc_norm,none"] == pytest.approx(sum(acc_norm) / 3)
    assert [s["input"] for s in results["samples"]["mc"]] == [f"Q: {q}\nA:" for q, _, _ in rows]


def test_loglikelihood_task_perplexity_and_greedy_acc(tiny, tmp_path):
    rows = [{"context": "the cat sat on the", "word": "mat"}, {"context": "one two three", "word": "four"}]
    data = write_jsonl(tmp_path / "ll.jsonl", rows)
    task = write_yaml(
        tmp_path / "ll.yaml",
        {
            "task": "ll",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data)}},
            "validation_split": "validation",
            "output_type": "loglikelihood",
            "doc_to_text": "context",
            "doc_to_target": "{{' ' + word}}",
        },
    )
    results = evaluate(tiny, [str(task)], footprint=False)
    expected = scoring.loglikelihood(tiny.model, tiny.tokenizer, [(r["context"], " " + r["word"]) for r in rows])
    row = results["results"]["ll"]
    assert row["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in expected) / 2))
    assert row["acc,none"] == pytest.approx(sum(g for _, g in expected) / 2)


def test_rolling_task_on_parquet_folder(tiny, tmp_path):
    texts = ["A short line of prose about rivers.", "Another text, with   several words in it."]
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"page": texts}), folder / "test-00000.parquet")
    task = write_yaml(
        tmp_path / "ppl.yaml",
        {
            "task": "ppl",
            "dataset_path": str(folder),
            "test_split": "test",
            "output_type": "loglikelihood_rolling",
            "doc_to_target": "page",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
    )
    results = evaluate(tiny, [str(task)], footprint=False)
    window = tiny.model.config.max_position_embeddings
    totals = scoring.loglikelihood_rolling(tiny.model, tiny.tokenizer, texts, max_length=min(window, 2048))
    ll = sum(t for t, _ in totals)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    row = results["results"]["ppl"]
    assert row["word_perplexity,none"] == pytest.approx(math.exp(-ll / words))
    assert row["bits_per_byte,none"] == pytest.approx(-ll / sum(len(t.encode()) for t in texts) / math.log(2))
    assert "byte_perplexity,none" not in row  # only the listed metrics, as lm-eval


def two_shot_task(tmp_path, **extra):
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": f"{n} + 1", "a": str(n + 1)} for n in range(4)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"q": "7 + 1", "a": "8"}, {"q": "8 + 1", "a": "9"}])
    base = write_yaml(
        tmp_path / "base.yaml",
        {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": str(train), "test": str(test)}},
            "training_split": "train",
            "test_split": "test",
            "doc_to_text": "Q: {{q}}\nA:",
            "doc_to_target": "a",
            "description": "Add one.\n\n",
            "num_fewshot": 2,
        },
    )
    return write_yaml(tmp_path / "child.yaml", {"include": base.name, "task": "add_one", **extra})


def test_two_shot_prompt_is_built_exactly_as_lm_eval(tmp_path):
    task = load_task(two_shot_task(tmp_path))  # include: everything but the name comes from base.yaml
    assert (task.name, task.num_fewshot, len(task.fewshot_docs)) == ("add_one", 2, 4)
    rng = random.Random(1234)
    assert [s.source["q"] for s in shots_for(task, task.docs[0], random.Random(1234))] == [
        f"{i} + 1" for i in rng.sample(range(4), 2)
    ]
    prompt = build_context(task, task.docs[0], shots_for(task, task.docs[0], random.Random(1234)))
    assert prompt == "Add one.\n\nQ: 3 + 1\nA: 4\n\nQ: 0 + 1\nA: 1\n\nQ: 7 + 1\nA:"
    with_system = build_context(task, task.docs[0], [], system_instruction="Be brief.")
    assert with_system == "Be brief.\n\nAdd one.\n\nQ: 7 + 1\nA:"


def test_included_keys_are_overridden_by_the_including_file(tmp_path):
    task = load_task(two_shot_task(tmp_path, doc_to_text="Question {{q}} =", num_fewshot=0))
    assert task.docs[0].text == "Question 7 + 1 =" and task.num_fewshot == 0


def test_chat_template_makes_each_shot_a_user_and_an_assistant_turn(tiny, tmp_path):
    path = two_shot_task(tmp_path, generation_kwargs={"until": ["\n"], "max_gen_toks": 2})
    task = load_task(path)
    shots = shots_for(task, task.docs[0], random.Random(1234))
    chat = build_context(task, task.docs[0], shots, system_instruction="Be brief.", tokenizer=tiny.tokenizer)
    assert chat == (
        "<|im_start|>system\nBe brief.\n\nAdd one.\n\n<|im_end|>\n"
        "<|im_start|>user\nQ: 3 + 1\nA:<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nQ: 0 + 1\nA:<|im_end|>\n<|im_start|>assistant\n1<|im_end|>\n"
        "<|im_start|>user\nQ: 7 + 1\nA:<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = evaluate(tiny, [str(path)], footprint=False, limit=1)["samples"]["add_one"][0]["input"]
    templated = evaluate(tiny, [str(path)], footprint=False, limit=1, apply_chat_template=True)
    assert plain == "Add one.\n\nQ: 3 + 1\nA: 4\n\nQ: 0 + 1\nA: 1\n\nQ: 7 + 1\nA:"
    assert templated["samples"]["add_one"][0]["input"] == (
        "<|im_start|>system\nAdd one.\n\n<|im_end|>\n"
        "<|im_start|>user\nQ: 3 + 1\nA:<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nQ: 0 + 1\nA:<|im_end|>\n<|im_start|>assistant\n1<|im_end|>\n"
        "<|im_start|>user\nQ: 7 + 1\nA:<|im_end|>\n<|im_start|>assistant\n"
    )
    assert templated["configs"]["add_one"]["apply_chat_template"] is True


def test_task_yaml_is_an_eval_task_for_training_commands(tmp_path):
    path = str(two_shot_task(tmp_path))
    assert EvalSettings(task=path).task == path
    broken = write_yaml(tmp_path / "broken.yaml", {"include": "base.yaml", "task": "t", "doc_to_text": "{{nope}}"})
    with pytest.raises(UserError, match="doc_to_text names column 'nope'"):
        EvalSettings(task=str(broken))  # checked when the config is read, before any model loads


def test_columns_flag_maps_jsonl_task_keys(tiny, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "say a", "solution": "zz"}])
    results = evaluate(tiny, [str(data)], footprint=False, columns={"prompt": "question", "answer": "solution"})
    assert results["samples"][str(data)][0]["prompt"] == "say a"
    assert results["samples"][str(data)][0]["target"] == "zz"


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, _, err = run_lmforge(monkeypatch, capsys, *args)
    return code, err


BAD = [
    ({"fewshot_config": {"sampler": "first_n"}}, "key 'fewshot_config' is not supported"),
    ({"doc_to_text": "Q: {{question}} {{passage}}"}, "doc_to_text names column 'passage'"),
    ({"doc_to_text": "passage"}, "doc_to_text 'passage' names no column"),
    (
        {"filter_list": [{"name": "m", "filter": [{"function": "regex", "regex_pattern": r"#### \d+"}]}]},
        "regex_pattern '#### \\\\d+' has no group",
    ),
    ({"filter_list": [{"name": "m", "filter": [{"function": "majority_vote"}]}]}, "function 'majority_vote'"),
    ({"metric_list": [{"metric": "bleu"}]}, "metric 'bleu' is not supported"),
    ({"metric_list": [{"metric": "exact_match", "ignore_spaces": True}]}, "option 'ignore_spaces'"),
    ({"generation_kwargs": {"do_sample": True}}, "do_sample must be false"),
    ({"dataset_path": "openai/gsm8k"}, "lmforge reads local data only"),
    ({"output_type": "multiple_choice"}, "needs doc_to_choice"),
    ({"test_split": "dev"}, "test_split 'dev' is not a split"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_task_yaml_is_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, change, message):
    inputs = tmp_path / "in"
    inputs.mkdir()
    data = write_jsonl(inputs / "gsm.jsonl", GSM)
    task = gsm_yaml(inputs, data, **change)
    out = tmp_path / "out"
    code, err = run_cli(
        monkeypatch, capsys, "eval", str(tmp_path / "no_such_model"), "--task", str(task), "--out", str(out)
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0] and str(task) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written


def test_data_file_missing_a_column_is_one_line(monkeypatch, capsys, tmp_path):
    rows = [GSM[0], {"question": "no answer here"}]
    data = write_jsonl(tmp_path / "gsm.jsonl", rows)
    task = gsm_yaml(tmp_path, data)
    code, err = run_cli(
        monkeypatch, capsys, "eval", str(tmp_path / "none"), "--task", str(task), "--out", str(tmp_path / "o")
    )
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "record 2 is missing column 'answer'" in err and "gsm.jsonl" in err
    assert not (tmp_path / "o").exists()


def test_include_of_missing_base_and_function_tag_are_one_line(monkeypatch, capsys, tmp_path):
    child = write_yaml(tmp_path / "child.yaml", {"include": "nope.yaml", "task": "t"})
    code, err = run_cli(monkeypatch, capsys, "eval", str(tmp_path / "none"), "--task", str(child))
    assert code == 2 and "task file not found" in err and "nope.yaml" in err
    fn = tmp_path / "fn.yaml"
    fn.write_text("task: t\nprocess_docs: !function utils.process_docs\n")
    code, err = run_cli(monkeypatch, capsys, "eval", str(tmp_path / "none"), "--task", str(fn))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "!function utils.process_docs" in err


def test_chat_flags_without_a_task_yaml_are_one_line(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "eval", str(tmp_path / "none"), "--task", "dates", "--apply-chat-template")
    assert code == 2 and "already use the model's chat template" in err
