"""Two gloo processes through Accelerate's own launch (configs/accelerate/ddp_cpu.yaml) equal one process.

One launch of tests/ddp_worker.py trains SFT (full, tied embedding), DPO (LoRA) and distillation (full) with
uneven token counts per rank; each is compared with one process over the same global batch, run here. Then
the README's command, `accelerate launch ... -m lmforge finetune`, is killed after a checkpoint, resumed, and
compared with one process; and a launch that would silently run one process is refused. Every launch has a
hard timeout (a hang is the usual multi-process failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ddp_worker
import psutil
import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.data.chat import IGNORE_INDEX
from lmforge.errors import UserError
from lmforge.models.tiny import make_tiny_llama
from lmforge.train.loop import epoch_order

ROOT = Path(__file__).resolve().parent.parent
DDP_CPU = ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"
TIMEOUT_S = 150


def launch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU), *args]


def environment(tmp: Path) -> dict:
    # CPU ranks (gloo) even where a GPU is visible; rank scratch folders land in `tmp`, where the test looks
    (tmp / "scratch").mkdir(parents=True, exist_ok=True)
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp / "scratch"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    make_tiny_llama(folder / "tiny", seed=0)
    make_tiny_llama(folder / "tiny_tied", seed=1, tie_embeddings=True)
    return folder


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict[int, Path]:
    """{processes: output folder} of the worker's cases, 2 processes launched, 1 process in this one."""
    two, one = tmp_path_factory.mktemp("two"), tmp_path_factory.mktemp("one")
    command = launch_command(str(ROOT / "tests" / "ddp_worker.py"), str(models), str(two))
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=environment(two))
    assert result.returncode == 0, result.stderr[-3000:]
    for case in ddp_worker.SETTINGS:
        ddp_worker.run_case(case, models, one, processes=1)
    return {2: two, 1: one}


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "history.json").read_text())


@pytest.mark.parametrize("case", list(ddp_worker.SETTINGS))
def test_two_processes_take_the_steps_of_one(runs, models, case):
    two, one = history(runs[2] / case), history(runs[1] / case)
    assert [h["tokens"] for h in two] == [h["tokens"] for h in one]
    assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-5)
    # the clipped norm is the global step's: it acted (above the limit) and equals one process's
    assert all(h["grad_norm"] > ddp_worker.MAX_GRAD_NORM for h in one)
    assert [h["grad_norm"] for h in two] == pytest.approx([h["grad_norm"] for h in one], rel=1e-5)
    two_weights, one_weights = (
        load_file(runs[2] / case / "weights.safetensors"),
        load_file(runs[1] / case / "weights.safetensors"),
    )
    assert two_weights.keys() == one_weights.keys() and one_weights
    base = "tiny_tied" if case == "sft" else "tiny"
    initial = load_file(models / base / "model.safetensors")
    moved = 0.0
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, atol=1e-4, rtol=1e-4)
        if name in initial:
            moved = max(moved, float((value - initial[name]).abs().max()))
    assert case == "dpo" or moved > 1e-2  # the updates dwarf the tolerance (DPO trains LoRA only)


def test_the_ranks_hold_uneven_tokens_and_see_each_row_once_per_epoch(runs, models):
    settings = ddp_worker.SETTINGS["sft"][2]
    per_step = settings[0] * settings[1] * 2
    order = epoch_order(ddp_worker.SFT_ROWS, seed=0, epoch=0)
    seen = [json.loads((runs[2] / "sft" / f"rows-rank{r}.json").read_text()) for r in (0, 1)]
    # 3 steps of 8 rows are one epoch of 24: the ranks together saw every row once, each in its own stride
    assert sorted(seen[0] + seen[1]) == list(range(ddp_worker.SFT_ROWS))
    for step in range(3):
        rows = order[step * per_step : (step + 1) * per_step]
        assert seen[0][step * 4 : step * 4 + 4] == rows[0::2] and seen[1][step * 4 : step * 4 + 4] == rows[1::2]
    tokenizer = lmforge.load_model(models / "tiny_tied").tokenizer
    rows = ddp_worker.sft_rows(tokenizer)
    labelled = [[sum(x != IGNORE_INDEX for x in rows[i]["labels"][1:]) for i in ids] for ids in seen]
    assert sum(labelled[0]) != sum(labelled[1])


def test_optimizer_in_backward_is_refused_under_two_processes(runs):
    for rank in (0, 1):
        message = (runs[2] / f"refusal-rank{rank}.txt").read_text()
        assert message == "train.optimizer_in_backward runs in one process, not 2: launch one, or turn it off"
    assert not (runs[2] / "refused-work").exists()


def test_export_is_written_by_rank_0_alone(runs, models):
    export = runs[2] / "export"
    assert sorted(p.name for p in export.glob("written-by-rank*")) == ["written-by-rank0"]
    assert (export / "model.safetensors").is_file() and not list(runs[2].glob(".export.partial*"))
    assert not list((runs[2] / "scratch").glob("lmforge-rank*"))  # rank 1's throwaway folder is gone
    saved, initial = load_file(export / "model.safetensors"), load_file(models / "tiny" / "model.safetensors")
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in initial)


def finetune_overrides(model: Path, out: Path, steps: int, accumulation: int) -> list[str]:
    return [
        f"model={model}",
        f"output={out}",
        "data.task=dates",
        "data.limit=64",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        f"train.grad_accum={accumulation}",
        "train.save_every=1",
        "train.lr=5e-3",
        "eval.limit=2",
        "eval.probe=false",
    ]


def test_readme_command_killed_then_resumed_equals_one_process(models, tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp_cpu.yaml -m lmforge finetune ...`, SIGKILLed after
    a checkpoint, then run again with --resume: the loss curve and the adapter of one process with the
    accumulation doubled; every rank exits 0, rank 0 alone writes the output."""
    out, steps = tmp_path / "two", 16
    args = ["finetune", *finetune_overrides(models / "tiny", out, steps, accumulation=2)]
    env = environment(tmp_path)
    killed = subprocess.Popen(
        launch_command("-m", "lmforge", *args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    state_file, deadline, step = Path(f"{out}.work") / "checkpoint" / "state.json", time.time() + TIMEOUT_S, 0
    try:
        while killed.poll() is None and time.time() < deadline and step < 2:
            time.sleep(0.02)
            with contextlib.suppress(OSError, ValueError):  # not written yet, or being replaced
                step = json.loads(state_file.read_text())["step"]
    finally:  # the launcher, torchrun's agent and the ranks (which torchrun starts in sessions of their own)
        processes = [psutil.Process(killed.pid), *psutil.Process(killed.pid).children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs(processes, timeout=30)
    assert 2 <= step < steps and not out.exists(), "the run ended before it could be killed"

    resumed = subprocess.run(
        launch_command("-m", "lmforge", *args, "--resume"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stderr and "Traceback" not in resumed.stderr
    assert not Path(f"{out}.work").exists() and not list(tmp_path.glob(".two.partial*"))
    assert not list((tmp_path / "scratch").glob("lmforge-rank*"))  # rank 1's throwaway output folder is gone

    one = lmforge.finetune(None, finetune_overrides(models / "tiny", tmp_path / "one", steps, accumulation=4))
    two_log = {e["step"]: e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e}
    one_log = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    one_log = [e for e in one_log if "loss" in e]
    assert sorted(two_log) == [e["step"] for e in one_log]  # the killed steps were taken again, once each
    assert [two_log[e["step"]]["loss"] for e in one_log] == pytest.approx([e["loss"] for e in one_log], rel=1e-4)
    two_adapter = load_file(out / "adapter_model.safetensors")
    one_adapter = load_file(one / "adapter_model.safetensors")
    assert two_adapter.keys() == one_adapter.keys()
    for name, value in one_adapter.items():
        torch.testing.assert_close(two_adapter[name], value, atol=1e-4, rtol=1e-3)


def test_accelerate_cpu_launch_of_one_process_is_refused(models, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (accelerate needs mpirun for more): the
    run says so in one line instead of training half the asked-for batch."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "lmforge"]
    out = tmp_path / "out"
    result = subprocess.run(
        [*command, "finetune", *finetune_overrides(models / "tiny", out, 2, accumulation=1)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=environment(tmp_path),
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("lmforge: error:")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "started one" in errors[0] and "configs/accelerate/ddp_cpu.yaml" in errors[0]
    assert not out.exists() and not Path(f"{out}.work").exists()


def test_tune_under_several_processes_is_refused(monkeypatch, tiny_llama, tmp_path):
    """Every rank would draw its own trial from the shared study and train it in lockstep with the others'."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="lmforge tune runs its trials in one process, not 2"):
        lmforge.tune(None, [f"model={tiny_llama}", f"output={tmp_path / 'out'}", "data.task=dates"])
    assert not (tmp_path / "out").exists()
