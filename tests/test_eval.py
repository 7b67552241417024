"""The evaluation harness end to end on a tiny model: metrics, k-shot, user tasks, output files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import run_cli

from lmforge.errors import UserError
from lmforge.eval import scoring
from lmforge.eval.run import evaluate, metrics_of, run_eval
from lmforge.eval.tasks import TASKS, get_task
from lmforge.models.load import load_model
from lmforge.report.record import RECORD_KEYS


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_tasks_cover_three_skills_and_the_probe():
    generate = [name for name, task in TASKS.items() if task.kind == "generate"]
    assert len(generate) >= 3
    assert TASKS["probe"].kind == "perplexity"
    assert len(TASKS["probe"].docs()) >= 10


def test_generate_task_results_layout(tiny):
    results = evaluate(tiny, ["dates"], limit=4, footprint=False)
    row = results["results"]["dates"]
    assert row["exact_match,none"] == 0.0  # a random model cannot rewrite dates
    assert "exact_match_stderr,none" in row
    assert results["n-samples"]["dates"] == {"original": 200, "effective": 4}
    assert results["configs"]["dates"]["output_type"] == "generate_until"
    assert len(results["samples"]["dates"]) == 4


def test_exact_match_counts_hits(tiny, tmp_path):
    """Targets set to what the model really generates score 1; others 0."""
    prompts = ["say a", "say b", "say c"]
    from lmforge.data.chat import chat_prompt

    rendered = [chat_prompt(tiny.tokenizer, p) for p in prompts]
    outputs = scoring.generate_until(tiny.model, tiny.tokenizer, rendered, ("\n",), 32)
    rows = [{"prompt": p, "answer": o} for p, o in zip(prompts[:2], outputs[:2], strict=True)] + [
        {"prompt": prompts[2], "answer": "zz"}
    ]
    results = evaluate(tiny, [str(write_jsonl(tmp_path / "t.jsonl", rows))], footprint=False)
    assert results["results"][str(tmp_path / "t.jsonl")]["exact_match,none"] == pytest.approx(2 / 3)


def test_multiple_choice_equals_hand_computed_loglikelihoods(tiny, tmp_path):
    rows = [
        {"prompt": "Pick one:", "choices": [" alpha", " beta", " gamma"], "answer": 1},
        {"prompt": "Colour?", "choices": [" red", " a much longer answer"], "answer": " red"},
    ]
    task = str(write_jsonl(tmp_path / "mc.jsonl", rows))
    results = evaluate(tiny, [task], footprint=False)
    expected_acc, expected_norm = [], []
    for row, sample in zip(rows, results["samples"][task], strict=True):
        requests = [(f"{row['prompt']}\n", choice) for choice in row["choices"]]
        lls = [score for score, _ in scoring.loglikelihood(tiny.model, tiny.tokenizer, requests, batch_size=1)]
        assert sample["loglikelihoods"] == pytest.approx(lls, rel=1e-5)
        answer = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        expected_acc.append(lls.index(max(lls)) == answer)
        normed = [ll / len(c.encode()) for ll, c in zip(lls, row["choices"], strict=True)]
        expected_norm.append(normed.index(max(normed)) == answer)
    row = results["results"][task]
    assert row["acc,none"] == pytest.approx(sum(expected_acc) / 2)
    assert row["acc_norm,none"] == pytest.approx(sum(expected_norm) / 2)


def test_perplexity_is_the_exp_of_the_mean_token_loss(tiny, tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "Merging two models: average their weights."]
    task = str(write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts]))
    row = evaluate(tiny, [task], footprint=False)["results"][task]
    total, tokens = 0.0, 0
    for text in texts:  # each text fits one window: one forward pass over it, after the BOS token
        ids = [tiny.tokenizer.bos_token_id] + tiny.tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            log_probs = torch.log_softmax(tiny.model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        total += log_probs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum().item()
        tokens += len(ids) - 1
    n_bytes = sum(len(t.encode()) for t in texts)
    assert row["tokens,none"] == tokens
    assert row["perplexity,none"] == pytest.approx(math.exp(-total / tokens), rel=1e-4)
    assert row["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)


def test_fewshot_prompts_hold_train_examples(tiny, monkeypatch):
    seen = []
    real = scoring.generate_until
    monkeypatch.setattr(
        scoring, "generate_until", lambda m, t, prompts, *a: seen.extend(prompts) or real(m, t, prompts, *a)
    )
    evaluate(tiny, ["arithmetic"], limit=2, num_fewshot=2, footprint=False)
    train_prompts = {r["prompt"] for r in get_task("arithmetic").shots()}
    for prompt in seen:
        assert prompt.count("<|im_start|>user") == 3  # two shots and the question
        assert sum(p in prompt for p in train_prompts) == 2
    again = []
    monkeypatch.setattr(
        scoring, "generate_until", lambda m, t, prompts, *a: again.extend(prompts) or real(m, t, prompts, *a)
    )
    evaluate(tiny, ["arithmetic"], limit=2, num_fewshot=2, footprint=False)
    assert again == seen  # seeded draw


def test_run_eval_writes_results_and_run_record(tiny_llama, tmp_path):
    out, results = run_eval(str(tiny_llama), ["dates", "probe"], out_dir=tmp_path / "ev", limit=2, batch_size=2)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(results["results"]))
    record = json.loads((out / "run.json").read_text())
    assert set(RECORD_KEYS) <= set(record)
    assert record["command"] == "eval"
    assert record["metrics"]["dates"]["exact_match"]["value"] == 0.0
    assert record["metrics"]["probe"]["perplexity"]["value"] == pytest.approx(
        results["results"]["probe"]["perplexity,none"]
    )
    footprint = results["footprint"]
    assert footprint["params_total"] == record["params_total"] > 0
    assert footprint["size_bytes"] == (tiny_llama / "model.safetensors").stat().st_size
    assert footprint["ms_per_token"] > 0 and footprint["prompt_tokens_per_s"] > 0
    assert record["inputs"]["model"]["fingerprint"].startswith("safetensors-sha256:")
    assert (out / "samples_dates.jsonl").read_text().count("\n") == 2
    assert not list(tmp_path.glob(".*partial*"))


def test_existing_output_is_refused(tiny_llama, tmp_path):
    (tmp_path / "ev").mkdir()
    with pytest.raises(UserError, match="--overwrite"):
        run_eval(str(tiny_llama), ["dates"], out_dir=tmp_path / "ev", limit=1)


def test_metrics_view_matches_results():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1}}}
    assert metrics_of(results) == {"t": {"acc": {"value": 0.5, "stderr": 0.1}}}


@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"prompt": "p"}], "missing key 'answer'"),
        ([{"prompt": "p", "choices": ["a"], "answer": 0}], "at least two"),
        ([{"prompt": "p", "choices": ["a", "b"], "answer": 5}], "choice index"),
        ([{"prompt": "p", "answer": "a"}, {"text": "t"}], "mixes task kinds"),
        ([], "is empty"),
    ],
)
def test_bad_user_task(tmp_path, rows, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as err:
        get_task(str(path))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        get_task("datez")
    assert "dates" in str(err.value) and "probe" in str(err.value)


@pytest.mark.slow
def test_default_model_cannot_do_the_tasks_before_finetuning():
    names = [name for name, task in TASKS.items() if task.kind == "generate"]
    results = evaluate("default", names + ["probe"], limit=40, batch_size=8, footprint=False)
    for name in names:
        assert results["results"][name]["exact_match,none"] <= 0.1, name
    assert 1.0 < results["results"]["probe"]["perplexity,none"] < 100


def words_task(tmp_path, n=8, name="words.jsonl"):
    """n generate records whose prompts are never substrings of each other."""
    rows = [{"prompt": f"Spell the word number {chr(65 + i)}{chr(65 + i)}.", "answer": f"w{i}x"} for i in range(n)]
    return write_jsonl(tmp_path / name, rows), rows


def test_user_task_holds_k_shots_out_of_its_own_file(tiny_llama, tmp_path):
    """-k 2 on a user file: 2 records become every prompt's shots and are not scored; the count is reported."""
    path, rows = words_task(tmp_path)
    out, results = run_eval(str(tiny_llama), [str(path)], out_dir=tmp_path / "ev", num_fewshot=2, footprint=False)
    samples = [json.loads(line) for line in (out / "samples_words.jsonl").read_text().splitlines()]
    scored = {sample["prompt"] for sample in samples}
    shots = [row for row in rows if row["prompt"] not in scored]
    assert len(samples) == 6 and len(shots) == 2  # the shots never appear among the scored records
    config = results["configs"][str(path)]
    assert config["fewshot_held_out"] == 2 and "held out" in config["fewshot_source"]
    assert results["n-samples"][str(path)]["effective"] == 6
    assert results["n-shot"][str(path)] == 2
    for sample in samples:
        assert sample["input"].count("<|im_start|>user") == 3  # two shots and the question
        for shot in shots:
            assert shot["prompt"] in sample["input"] and shot["answer"] in sample["input"]
        assert 0.0 <= results["results"][str(path)]["exact_match,none"] <= 1.0
    again = evaluate(str(tiny_llama), [str(path)], num_fewshot=2, footprint=False)
    assert [s["input"] for s in again["samples"][str(path)]] == [s["input"] for s in samples]  # seeded


def test_fewshot_file_from_the_cli_scores_every_task_record(monkeypatch, capsys, tiny_llama, tmp_path):
    path, rows = words_task(tmp_path, n=4)
    shots_path, shots = words_task(tmp_path, n=8, name="shots.jsonl")
    shots = shots[4:]  # prompts EE..HH: none of them is a task record
    write_jsonl(shots_path, shots)
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", str(tiny_llama), "--task", str(path), "-k", "2",
        "--fewshot-file", str(shots_path), "--out", str(tmp_path / "ev"), "--no-footprint",
    )  # fmt: skip
    assert code == 0, err
    samples = [json.loads(line) for line in (tmp_path / "ev" / "samples_words.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in rows]  # nothing held out
    for sample in samples:
        assert sum(shot["prompt"] in sample["input"] for shot in shots) == 2
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["configs"][str(path)]["fewshot_source"] == f"fewshot file {shots_path}"
    assert results["configs"][str(path)]["fewshot_held_out"] == 0


def test_multiple_choice_shots_show_the_right_choice(tiny, tmp_path):
    task = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "Colour?", "choices": [" red", " blue"], "answer": 0}])
    shots = write_jsonl(tmp_path / "mc_shots.jsonl", [{"prompt": "Sky?", "choices": [" red", " blue"], "answer": 1}])
    results = evaluate(tiny, [str(task)], num_fewshot=1, fewshot_file=shots, footprint=False)
    assert results["samples"][str(task)][0]["input"] == "Sky?\n blue\n\nColour?\n"


@pytest.mark.parametrize(
    "k, fewshot, fragments",
    [
        (8, None, ["words.jsonl", "-k 8", "none to score"]),
        (3, "short", ["short.jsonl", "fewer than -k 3"]),
        (2, "mc", ["mc.jsonl", "{prompt, choices, answer}"]),
        (2, "missing", ["missing.jsonl", "not found"]),
        (2, "task", ["is the task file itself"]),
        (0, "short", ["short.jsonl", "-k is 0"]),
    ],
)
def test_fewshot_mistakes_stop_in_one_line_before_the_model_loads(monkeypatch, capsys, tmp_path, k, fewshot, fragments):
    """The model reference does not exist: the k-shot error must be the one reported, so it came first."""
    path, _ = words_task(tmp_path)
    write_jsonl(tmp_path / "short.jsonl", [{"prompt": "p", "answer": "a"}, {"prompt": "q", "answer": "b"}])
    write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "p", "choices": ["a", "b"], "answer": 0}] * 3)
    args = ["eval", str(tmp_path / "no_such_model"), "--task", str(path), "-k", str(k), "--out", str(tmp_path / "o")]
    if fewshot:
        args += ["--fewshot-file", str(path if fewshot == "task" else tmp_path / f"{fewshot}.jsonl")]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err
    assert "no_such_model" not in err
    assert not (tmp_path / "o").exists()


def test_fewshot_checks_pass_then_the_missing_model_is_reported(tmp_path):
    """Control for the test above: with a valid -k the same call gets as far as loading, and fails there."""
    path, _ = words_task(tmp_path)
    with pytest.raises(UserError, match="no_such_model"):
        evaluate(str(tmp_path / "no_such_model"), [str(path)], num_fewshot=2)


def test_builtin_task_k_larger_than_its_train_split_is_refused_before_loading(tmp_path):
    with pytest.raises(UserError, match="fewer than -k 2001"):
        evaluate(str(tmp_path / "no_such_model"), ["dates"], num_fewshot=2001)
    with pytest.raises(UserError, match="for .jsonl tasks"):
        evaluate(str(tmp_path / "no_such_model"), ["dates"], num_fewshot=2, fewshot_file=tmp_path / "s.jsonl")
