"""`lmforge data filter` on a tiny model: IFD against a naive computation, each rule's drops, the exact-answer
solvers against the built-in splits, the seeded corruption, the recipe step and bad inputs as one line."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from cli_helpers import run_cli
from rich.console import Console

from lmforge.data import synthetic
from lmforge.data.answers import SOLVERS, corrupt
from lmforge.data.chat import chat_prompt
from lmforge.data.filter import answer_losses, filter_data
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.recipe.runner import run_recipe

DATES = synthetic.examples("dates", "train", 12)
ARITHMETIC = synthetic.examples("arithmetic", "train", 2)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def reasons(folder) -> dict[int, str]:
    lines = (folder / "dropped.jsonl").read_text().splitlines()
    return {row["index"]: row["reason"] for row in map(json.loads, lines)}


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(str(tiny_llama))


@pytest.mark.parametrize("task", sorted(SOLVERS))
def test_each_solver_recomputes_every_answer_of_both_splits(task):
    for split in synthetic.SPLITS:
        records = synthetic.examples(task, split)
        assert [SOLVERS[task](r["prompt"]) for r in records] == [r["answer"] for r in records]
    other = next(name for name in SOLVERS if name != task)
    assert SOLVERS[task](synthetic.examples(other, "test", 1)[0]["prompt"]) is None


def test_corruption_makes_the_asked_share_wrong_with_other_records_answers():
    records = synthetic.examples("sorting", "train", 200)
    noisy, wrong = corrupt(records, 0.3, seed=5)
    assert len(wrong) == 60 and noisy == corrupt(records, 0.3, seed=5)[0]
    changed = {i for i, (a, b) in enumerate(zip(records, noisy, strict=True)) if a["answer"] != b["answer"]}
    assert changed == wrong
    answers = {r["answer"] for r in records}
    assert all(noisy[i]["answer"] in answers for i in wrong)  # right format, wrong value


def test_ifd_equals_a_naive_per_record_computation(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    records = [{"prompt": r["prompt"], "completion": r["answer"]} for r in DATES[:3] + ARITHMETIC]
    records.append({"prompt": "Say hi.", "completion": "hello there, how are you today?"})
    batched = answer_losses(model, tokenizer, records, batch_size=3)  # padded batches of unequal lengths

    def naive(prefix: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prefix + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        return F.cross_entropy(logits[len(prefix) - 1 : -1].float(), torch.tensor(answer)).item()

    for record, (conditioned, alone) in zip(records, batched, strict=True):
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        prompt = tokenizer(chat_prompt(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        assert conditioned == pytest.approx(naive(prompt, answer), rel=1e-5)
        assert alone == pytest.approx(naive([start], answer), rel=1e-5)
        assert conditioned / alone != pytest.approx(1.0)  # the prompt changes the loss: both sides were scored


def test_cheap_rules_drop_truncated_repetitive_wrong_and_unverifiable_records(tiny_llama, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["answer"]} for r in DATES[:4]]
    rows[1]["completion"] = DATES[5]["answer"]  # a wrong date
    rows.append({"prompt": ARITHMETIC[0]["prompt"], "completion": ARITHMETIC[0]["answer"]})  # not a dates prompt
    rows.append({"prompt": DATES[6]["prompt"], "completion": " ".join(["12/03/1999"] * 40)})  # long and repetitive
    rows.append({"prompt": DATES[7]["prompt"], "completion": "ab " * 6})  # short, repetitive
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = filter_data(data=str(data), output=str(tmp_path / "out"), model=str(tiny_llama), verify="dates",
                         max_length=120, ifd_max=None)  # fmt: skip
    assert reasons(result.output) == {1: "wrong_answer", 4: "unverifiable", 5: "truncated", 6: "repetitive"}
    kept = [json.loads(line) for line in (result.output / "kept.jsonl").read_text().splitlines()]
    assert kept == [rows[0], rows[2], rows[3]]
    table = (result.output / "reasons.csv").read_text().splitlines()
    assert table[:2] == ["reason,records,share", "kept,3,0.4286"] and "wrong_answer,1,0.1429" in table


def test_score_rules_drop_by_nll_and_ifd_bounds_and_keep_the_ranked_share(loaded, tiny_llama, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["answer"]} for r in DATES]
    scores = answer_losses(loaded.model, loaded.tokenizer, rows)
    nll = [c for c, _ in scores]
    ifd = [c / a for c, a in scores]
    nll_cut, ifd_cut = sorted(nll)[8], sorted(ifd)[3]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = {"data": str(data), "model": str(tiny_llama), "overwrite": True}
    first = filter_data(output=str(tmp_path / "a"), nll_max=nll_cut, ifd_max=None, **common)
    assert reasons(first.output) == {i: "nll_high" for i, v in enumerate(nll) if v > nll_cut}
    second = filter_data(output=str(tmp_path / "b"), ifd_min=ifd_cut, ifd_max=None, **common)
    assert reasons(second.output) == {i: "ifd_low" for i, v in enumerate(ifd) if v < ifd_cut}
    third = filter_data(output=str(tmp_path / "c"), ifd_max=None, keep_fraction=0.25, keep_by="ifd_high", **common)
    top = sorted(range(len(rows)), key=lambda i: -ifd[i])[:3]
    assert set(range(len(rows))) - set(reasons(third.output)) == set(top)
    dropped = [json.loads(line) for line in (third.output / "dropped.jsonl").read_text().splitlines()]
    assert all(row["ifd"] == pytest.approx(ifd[row["index"]], rel=1e-5) for row in dropped)
    scored = [json.loads(line) for line in (third.output / "scores.jsonl").read_text().splitlines()]
    assert [row["nll"] for row in scored] == pytest.approx(nll, rel=1e-5)
    assert {row["index"] for row in scored if row["reason"] == "kept"} == set(top)


def test_a_filter_that_keeps_nothing_is_one_error_and_writes_nothing(tiny_llama, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": DATES[(i + 1) % 4]["answer"]} for i, r in enumerate(DATES[:4])]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match="would keep none of 4 records .*wrong_answer 4"):
        filter_data(data=str(data), output=str(tmp_path / "out"), model=str(tiny_llama), verify="dates")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [data]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "dates", "--data", "d.jsonl"], "data or task: give exactly one of them"),
        (["--task", "dates", "nll_min=3", "nll_max=2"], "nll_min (3.0) must not exceed nll_max (2.0)"),
        (["--task", "dates", "--verify", "date"], "verify must be one of dates"),
        (["--task", "dates", "--keep-fraction", "0"], "keep_fraction must be in (0, 1]"),
        (["--data", "missing.jsonl"], "data file not found: missing.jsonl"),
        (["--data", "chat.jsonl"], "the filter reads prompt/completion records"),
    ],
)
def test_bad_inputs_are_one_line_and_write_nothing(tiny_llama, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    code, _, err = run_cli(monkeypatch, capsys, "data", "filter", *args, "--out", "out", "--model", str(tiny_llama))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_cli_prints_the_table_and_a_recipe_step_feeds_a_finetune(tiny_llama, tmp_path, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "data", "filter", "--task", "dates", "--out", str(tmp_path / "cli"),
                           "--model", str(tiny_llama), "--verify", "dates", "limit=6", "ifd_max=null")  # fmt: skip
    assert code == 0 and "kept 6 of 6" in out and "kept.jsonl" in out
    steps = [
        {"name": "clean", "kind": "filter", "config": {"task": "dates", "limit": 16, "model": str(tiny_llama)}},
        {
            "name": "tuned",
            "kind": "finetune",
            "config": {
                "model": str(tiny_llama),
                "data": {"path": "${steps.clean.output}/kept.jsonl"},
                "train": {"max_steps": 1, "batch_size": 4, "save_every": 100},
                "eval": {"limit": 1, "batch_size": 1, "probe": False},
            },
        },
    ]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output": str(tmp_path / "r"), "steps": steps}), encoding="utf-8")
    root = run_recipe(recipe, isolate=False, console=Console(file=io.StringIO()))
    kept = (root / "clean" / "kept.jsonl").read_text().splitlines()
    summary = json.loads((root / "clean" / "filter.json").read_text())
    assert summary["records"] == 16 and summary["kept"] == len(kept) >= 1
    run = json.loads((root / "tuned" / "run.json").read_text())
    assert run["data"]["train_records"] + run["data"].get("val_records", 0) == len(kept), run["data"]
