"""User mistakes on the training verbs: one line naming the key, exit 2, before any model loads, nothing left.

Each command points its model at a folder that does not exist: the key's error must be the one reported,
so the check provably runs before the model is looked at.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from cli_helpers import run_cli

from lmforge.data.sources import load_records


def one_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lmforge: error: ")
    return lines[0]


VERBS = {
    "finetune": ["--model", "{missing}", "--task", "dates"],
    "dpo": ["--model", "{missing}", "--data", "{missing}.jsonl"],
    "distill": ["--teacher", "{missing}", "--task", "dates"],
}
MISTAKES = [
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
    ("train.lr=-1", "train.lr must be > 0, got -1.0"),
    ("train.max_steps=0", "train.max_steps must be >= 1, got 0"),
    ("lora.r=-4", "lora.r must be >= 1, got -4"),
    ("lora.alpha=0", "lora.alpha must be > 0, got 0.0"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1), got 1.5"),
    ("data.max_length=0", "data.max_length must be >= 1, got 0"),
    ("eval.limit=0", "eval.limit must be >= 1, got 0"),
    ("eval.task=nope", "eval.task is not a task: use one of dates, arithmetic"),
]
OWN_MISTAKES = [
    ("dpo", "beta=0", "beta must be > 0, got 0"),
    ("dpo", "data.limit=0", "data.limit must be >= 1, got 0"),
    ("distill", "signal.top_k=0", "signal.top_k must be >= 1, got 0"),
    ("distill", "signal.on_policy_fraction=2", "signal.on_policy_fraction must be in [0, 1], got 2"),
    ("distill", "student_layers=0", "student_layers must be >= 1, got 0"),
    ("distill", "rationale.alpha=-1", "rationale.alpha must be in [0, 1], got -1"),
    ("distill", "chunk_size=0", "chunk_size must be >= 1, got 0"),
    ("distill", "objectives=[{loss: tv, temperature: 0}]", "objectives[0] (tv): temperature must be > 0"),
]


def verb_args(verb: str, tmp_path) -> list[str]:
    missing = str(tmp_path / "no_such_model")
    return [verb, *(a.format(missing=missing) for a in VERBS[verb]), "--out", str(tmp_path / "out")]


def assert_nothing_left(tmp_path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output, work or staging folder may be left"


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize(("override", "message"), MISTAKES)
def test_bad_value_is_one_line_naming_the_key_before_the_model_loads(
    monkeypatch, capsys, tmp_path, verb, override, message
):
    code, _, err = run_cli(monkeypatch, capsys, *verb_args(verb, tmp_path), override)
    assert one_line(code, err).startswith(f"lmforge: error: override: {message}")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(("verb", "override", "message"), OWN_MISTAKES)
def test_bad_value_of_one_command(monkeypatch, capsys, tmp_path, verb, override, message):
    code, _, err = run_cli(monkeypatch, capsys, *verb_args(verb, tmp_path), override)
    assert message in one_line(code, err)
    assert_nothing_left(tmp_path)


def test_bad_value_in_a_config_file_names_the_file(monkeypatch, capsys, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "model": "nowhere", "train": {"batch_size": 0}}))
    code, _, err = run_cli(monkeypatch, capsys, "finetune", str(config))
    assert one_line(code, err) == f"lmforge: error: {config}: train.batch_size must be >= 1, got 0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.yaml"]


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize(
    ("flag", "override", "key"),
    [
        (["--steps", "2"], "train.max_steps=2.5", "train.max_steps"),
        (["--lr", "0.1"], "train={lr: 0.2}", "train.lr"),
        (["--columns", "prompt=question"], "data.columns.prompt=q", "data.columns"),
        (["--overwrite"], "overwrite=false", "overwrite"),
    ],
)
def test_a_flag_and_a_key_that_disagree_are_one_line(monkeypatch, capsys, tmp_path, verb, flag, override, key):
    code, _, err = run_cli(monkeypatch, capsys, *verb_args(verb, tmp_path), *flag, override)
    line = one_line(code, err)
    assert f"{flag[0]}" in line and f"'{override}'" in line and f"set {key} to different values" in line
    assert_nothing_left(tmp_path)


def test_columns_flag_maps_keys_and_exported_answers_train(monkeypatch, capsys, tiny_llama, tmp_path):
    """`data export` writes {prompt, answer}; finetune trains on it, and --columns maps other key names."""
    exported = tmp_path / "dates.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "data", "export", "dates", "--out", str(exported))
    assert code == 0, err
    assert load_records(exported)[0].keys() == {"prompt", "completion", "format"}
    renamed = tmp_path / "renamed.jsonl"
    rows = [json.loads(line) for line in exported.read_text().splitlines()[:12]]
    renamed.write_text("".join(json.dumps({"question": r["prompt"], "reply": r["answer"]}) + "\n" for r in rows))
    quick = ["train.batch_size=4", "train.save_every=100", "eval.probe=false", "data.limit=12", "--steps", "1"]
    for data, extra in ((exported, []), (renamed, ["--columns", "prompt=question,completion=reply"])):
        out = tmp_path / f"ft-{data.stem}"
        code, stdout, err = run_cli(
            monkeypatch, capsys, "finetune", "--model", str(tiny_llama), "--data", str(data), "--out", str(out),
            *quick, *extra,
        )  # fmt: skip
        assert code == 0, err
        written = yaml.safe_load((out / "lmforge.yaml").read_text())
        assert written["data"]["columns"] == ({"prompt": "question", "completion": "reply"} if extra else {})


def test_merge_flag_and_param_that_disagree(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(
        monkeypatch, capsys, "merge", "--method", "slerp", "--base", "a", "a", "b", "--t", "0.5",
        "--param", "t=0.3", str(tmp_path / "out"),
    )  # fmt: skip
    line = one_line(code, err)
    assert "--param 't=0.3'" in line and "--t 0.5" in line and "set t to different values" in line
    assert_nothing_left(tmp_path)


def test_ctrl_c_during_tune_is_one_line_that_keeps_the_study(tiny_llama, tmp_path):
    """A real SIGINT mid-trial: Optuna's logged traceback is gone; one line says the study is kept and how to
    continue it; exit 130; the trial's work folder is cleaned up."""
    config = tmp_path / "tune.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama),
                "output": str(tmp_path / "out"),
                "data": {"task": "dates", "limit": 48, "val_fraction": 0.2},
                "train": {"batch_size": 8, "save_every": 100000},
                "space": {"max_steps": [100000, 100000]},  # a trial that cannot end before the signal
                "eval": {"limit": 1, "probe": False},
            }
        )
    )
    command = [sys.executable, "-c", "from lmforge.cli import main; main()", "tune", str(config), "--trials", "2"]
    # A user's terminal delivers Ctrl-C with SIGINT's default action; a test run started in the background by a
    # shell without job control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    trials = tmp_path / "out" / "trials"
    deadline = time.monotonic() + 120

    def training() -> bool:  # the trial has logged a step: Ctrl-C lands inside the training loop
        return any(log.stat().st_size for log in trials.glob("*.work/log.jsonl"))

    while not training() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()  # never leave a 100,000-step trial running behind a failed test
    assert process.returncode == 130, err
    assert "Traceback" not in err and "Trial 0 failed" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith("lmforge: ") for line in lines), err
    study = tmp_path / "out" / "study.db"
    assert lines[-1] == (
        f"lmforge: interrupted: the study in {study} is kept (the interrupted trial will run again from its start, "
        f"not from its checkpoint); continue it with: lmforge tune {config} trials=2 --resume"
    )
    assert study.is_file() and not list(trials.glob("*.work")) and not (tmp_path / "out" / "best").exists()
