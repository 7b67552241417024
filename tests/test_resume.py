"""Resume: an interrupted run continues only with the config it started with, a finished run is not
retrained, and Ctrl-C says where the checkpoint is and which command resumes (finetune, dpo, distill)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli as run_lmforge

from lmforge import config as config_io
from lmforge.distill.run import DistillConfig, run_distill
from lmforge.errors import UserError
from lmforge.finetune.dpo import DPOConfig, run_dpo
from lmforge.finetune.sft import SFTConfig, run_sft
from lmforge.models.tiny import make_tiny_llama
from lmforge.train.workdir import resume_command

# Settings every run here shares, given to the CLI as key=value arguments and to the Python API as overrides.
COMMON = [
    "data.limit=32",
    "train.batch_size=4",
    "train.lr=5e-3",
    "train.save_every=100",
    "eval.limit=2",
    "eval.batch_size=2",
    "eval.probe=false",
]


def finetune_args(model, out, task: str = "arithmetic", steps: int = 6, *extra: str) -> list[str]:
    return [
        "finetune",
        "--model",
        str(model),
        "--task",
        task,
        "--out",
        str(out),
        "--steps",
        str(steps),
        *COMMON,
        *extra,
    ]


def sft_config(model, out, steps: int = 6) -> SFTConfig:
    overrides = [f"model={model}", "data.task=arithmetic", f"output={out}", f"train.max_steps={steps}", *COMMON]
    return config_io.load(None, SFTConfig, overrides)


def stop_after(step: int):
    """An on_log hook that presses Ctrl-C once the loop has logged `step`."""

    def on_log(entry: dict) -> None:
        if entry.get("step") == step and "loss" in entry:
            raise KeyboardInterrupt

    return on_log


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, _, err = run_lmforge(monkeypatch, capsys, *args)
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def interrupted(tiny_llama, tmp_path_factory) -> Path:
    """An SFT run stopped by Ctrl-C after step 3 of 6: its output folder does not exist, its work folder does."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_config(tiny_llama, out), on_log=stop_after(3))
    assert not out.exists() and (Path(f"{out}.work") / "checkpoint" / "state.json").is_file()
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("other") / "tiny_b", seed=7)


@pytest.mark.parametrize(
    ("change", "first_difference"),
    [
        ("model", "model="),
        ("task", "data.task=arithmetic, this run has dates"),
        ("steps", "train.max_steps=6, this run has 8"),
        ("lora.r", "lora.r=16, this run has 4"),
    ],
)
def test_resume_with_another_config_is_refused_and_the_work_folder_kept(
    monkeypatch, capsys, tiny_llama, other_model, interrupted, change, first_difference
):
    work = Path(f"{interrupted}.work")
    before = snapshot(work)
    args = {
        "model": finetune_args(other_model, interrupted),
        "task": finetune_args(tiny_llama, interrupted, "dates"),
        "steps": finetune_args(tiny_llama, interrupted, "arithmetic", 8),
        "lora.r": finetune_args(tiny_llama, interrupted, "arithmetic", 6, "lora.r=4"),
    }[change]
    code, err = run_cli(monkeypatch, capsys, *args, "--resume")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"lmforge: error: --resume: {work} was started with {first_difference}")
    assert snapshot(work) == before and not interrupted.exists()


def test_resume_of_a_finished_run_says_so_and_leaves_it(monkeypatch, capsys, tiny_llama, tmp_path):
    out = tmp_path / "done"
    assert run_cli(monkeypatch, capsys, *finetune_args(tiny_llama, out, "arithmetic", 2))[0] == 0
    before = snapshot(out)
    code, err = run_cli(monkeypatch, capsys, *finetune_args(tiny_llama, out, "arithmetic", 2), "--resume")
    assert code == 2
    assert err.strip() == f"lmforge: error: {out} is a finished run; pass --overwrite to train it again"
    assert snapshot(out) == before and not Path(f"{out}.work").exists()


def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes_it(monkeypatch, capsys, caplog, tiny_llama, tmp_path):
    out = tmp_path / "run"
    args = finetune_args(tiny_llama, out)
    monkeypatch.setattr(sys, "argv", ["lmforge", *args])  # as if typed: the hint repeats the user's command line
    with caplog.at_level(logging.INFO, logger="lmforge"), pytest.raises(KeyboardInterrupt):
        run_sft(sft_config(tiny_llama, out), on_log=stop_after(2))
    assert f"interrupted after step 2 of 6: checkpoint saved in {out}.work/checkpoint" in caplog.text
    command = f"lmforge finetune --model {tiny_llama} --task arithmetic --out {out} --steps 6 "
    assert f"to resume: {command}{' '.join(COMMON)} --resume" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmforge"):
        code, err = run_cli(monkeypatch, capsys, *args, "--resume")  # the command the hint printed
    assert code == 0, err
    assert f"resuming from step 2 of 6 ({out}.work/checkpoint)" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 2] == [1, 2] and steps[-1] == 6 and not Path(f"{out}.work").exists()


def test_resume_command_adds_the_flag_once_and_falls_back_to_the_key(tmp_path):
    work = tmp_path / "x.work"
    assert resume_command(work, ["/venv/bin/lmforge", "dpo", "--out", "a b"]) == "lmforge dpo --out 'a b' --resume"
    assert resume_command(work, ["lmforge", "distill", "c.yaml", "--resume"]) == "lmforge distill c.yaml --resume"
    for argv in (["python", "train.py"], ["lmforge", "run", "recipe.yaml"]):
        assert resume_command(work, argv).startswith("run the same config again with resume: true")


def _dpo_config(model, tmp_path: Path, *overrides: str) -> DPOConfig:
    data = tmp_path / "pairs.jsonl"
    pairs = [
        {"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "maybe"} for i in range(16)
    ]
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    base = [f"model={model}", f"output={tmp_path / 'dpo'}", f"data.path={data}", "lora.r=4", *COMMON]
    return config_io.load(None, DPOConfig, [*base, "data.limit=null", *overrides])


def _distill_config(model, tmp_path: Path, *overrides: str) -> DistillConfig:
    base = [f"teacher={model}", f"output={tmp_path / 'distill'}", "student_layers=1", "data.task=dates", *COMMON]
    return config_io.load(None, DistillConfig, [*base, *overrides])


@pytest.mark.parametrize("command", ["dpo", "distill"])
def test_dpo_and_distill_refuse_a_resume_with_another_schedule(tiny_llama, tmp_path, command):
    make, run = {"dpo": (_dpo_config, run_dpo), "distill": (_distill_config, run_distill)}[command]
    with pytest.raises(KeyboardInterrupt):
        run(make(tiny_llama, tmp_path, "train.max_steps=4"), on_log=stop_after(2))
    with pytest.raises(UserError, match=r"was started with train\.max_steps=4, this run has 5"):
        run(make(tiny_llama, tmp_path, "train.max_steps=5", "resume=true"))
    output = run(make(tiny_llama, tmp_path, "train.max_steps=4", "resume=true"))  # the same config resumes
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and steps[-1] == 4
