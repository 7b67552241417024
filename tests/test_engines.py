"""The engine and precision a training run resolves (lmforge/train/engines.py), and what it refuses.

Launches are what `accelerate launch` hands each process (its environment); the FSDP refusal is checked
through a real `accelerate launch --config_file configs/accelerate/fsdp2.yaml` on this CPU machine, where
Accelerate alone would run the job as plain DDP. Every refusal is one line, and nothing is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import run_cli

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.finetune.sft import SFTConfig
from lmforge.train.engines import (
    Engine,
    check_engine,
    launched_engine,
    refuse_generation_under_sharding,
    resolve_mixed_precision,
)

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--steps", "2", "train.batch_size=4", "train.save_every=100", "eval.probe=false", "eval.limit=4"]
QUICK += ["data.limit=8"]
DEEPSPEED, ZERO_STAGE = "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"
LAUNCH_VARIABLES = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED", "WORLD_SIZE")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Engine("single", 1)),
        ({"WORLD_SIZE": "2"}, Engine("ddp", 2)),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}, Engine("fsdp2", 2)),
        ({DEEPSPEED: "true", ZERO_STAGE: "3", "WORLD_SIZE": "4"}, Engine("zero3", 4)),
        ({DEEPSPEED: "true", ZERO_STAGE: "2"}, Engine("zero2", 1)),
    ],
)  # fmt: skip
def test_engine_from_the_launch_environment(env, expected):
    assert launched_engine(env) == expected


def test_zero_stage_read_from_a_deepspeed_json(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config), "WORLD_SIZE": "2"}
    assert launched_engine(env) == Engine("zero3", 2)


def test_fsdp1_is_refused_naming_the_key():
    with pytest.raises(UserError, match="fsdp_version: 2"):
        launched_engine({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_zero_without_deepspeed_is_one_line_with_the_fix():
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here: its absence cannot be shown")
    with pytest.raises(UserError, match=r"deepspeed is not installed: pip install deepspeed") as error:
        check_engine(Engine("zero3", 2), cuda=True)
    assert "\n" not in str(error.value)
    check_engine(Engine("ddp", 2), cuda=False)  # plain DDP runs anywhere


@pytest.mark.parametrize(
    ("requested", "device", "bf16", "expected"),
    [
        ("auto", "cpu", False, "no"),
        ("auto", "cuda", True, "bf16"),
        ("auto", "cuda", False, "no"),
        ("bf16", "cpu", False, "bf16"),  # CPU autocast computes bf16
        ("fp16", "cuda", True, "fp16"),
        ("no", "cuda", True, "no"),
    ],
)
def test_mixed_precision_resolution(requested, device, bf16, expected):
    assert resolve_mixed_precision(requested, device, bf16) == expected


@pytest.mark.parametrize(("requested", "device", "bf16"), [("fp16", "cpu", False), ("bf16", "cuda", False)])
def test_mixed_precision_the_device_cannot_do(requested, device, bf16):
    with pytest.raises(UserError, match=rf"train.mixed_precision: {requested} .*: set it to"):
        resolve_mixed_precision(requested, device, bf16)


def test_yaml_no_is_read_as_no():
    """YAML 1.1 reads a bare `no` as false; the config takes it as the precision `no`."""
    cfg = config_io.load(None, SFTConfig, ["output=o", "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    assert config_io.to_dict(cfg)["train"]["mixed_precision"] == "no"


def test_generation_refused_only_where_weights_are_sharded_over_processes():
    with pytest.raises(UserError, match="signal.kind: offline or cached"):
        refuse_generation_under_sharding("signal.kind: on_policy", Engine("zero3", 2))
    with pytest.raises(UserError, match="fsdp2"):
        refuse_generation_under_sharding("signal.kind: sequence", Engine("fsdp2", 2))
    for engine in (Engine("fsdp2", 1), Engine("ddp", 2), Engine("zero2", 2), Engine("single", 1)):
        refuse_generation_under_sharding("signal.kind: on_policy", engine)


def _one_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def plain_launch(monkeypatch):
    """No launch variables from the environment the tests run in."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_fp16_on_cpu_is_one_line_and_nothing_written(monkeypatch, capsys, tiny_llama, tmp_path, plain_launch):
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_llama), "--task", "dates", "--out", str(out), *QUICK]
    code, _, err = run_cli(monkeypatch, capsys, *args, "train.mixed_precision=fp16")
    assert "train.mixed_precision: fp16 needs a CUDA GPU" in _one_line(code, err)
    assert list(tmp_path.iterdir()) == []


def test_zero_launch_on_cpu_is_one_line_and_nothing_written(monkeypatch, capsys, tiny_llama, tmp_path, plain_launch):
    """The environment `accelerate launch --config_file configs/accelerate/zero3.yaml` gives each process."""
    for name, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}.items():
        monkeypatch.setenv(name, value)
    args = ["finetune", "--model", str(tiny_llama), "--task", "dates", "--out", str(tmp_path / "run"), *QUICK]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    line = _one_line(code, err)
    assert "DeepSpeed ZeRO-3" in line and "ddp_cpu.yaml" in line
    assert list(tmp_path.iterdir()) == []


def test_accumulation_under_deepspeed_is_refused_before_anything_loads(
    monkeypatch, capsys, tiny_llama, tmp_path, plain_launch
):
    """The loop does not yet accumulate through DeepSpeed's engine (it would step every micro-batch): refused."""
    for name, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}.items():
        monkeypatch.setenv(name, value)
    args = ["finetune", "--model", str(tiny_llama), "--task", "dates", "--out", str(tmp_path / "run"), *QUICK]
    code, _, err = run_cli(monkeypatch, capsys, *args, "train.grad_accum=2")
    line = _one_line(code, err)
    assert "train.grad_accum: 2 under DeepSpeed" in line and "train.batch_size" in line
    assert list(tmp_path.iterdir()) == []


def test_on_policy_distillation_under_sharding_is_refused(monkeypatch, capsys, tiny_llama, tmp_path, plain_launch):
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    args = ["distill", "--teacher", str(tiny_llama), "--student-layers", "1", "--task", "dates"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--out", str(tmp_path / "run"), "signal.kind=on_policy")
    assert "signal.kind: on_policy generates text" in _one_line(code, err)
    assert list(tmp_path.iterdir()) == []


def test_fsdp_config_on_cpu_through_accelerate_launch(tiny_llama, tmp_path):
    """The shipped FSDP2 config, launched as the README says, on this GPU-less machine: one lmforge line naming
    the config and the CPU config to use instead; no output or work folder."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes", "1",
        "-m", "lmforge", "finetune", "--model", str(tiny_llama), "--task", "dates", "--out", str(out), *QUICK,
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("lmforge: error:")]
    assert result.returncode != 0 and len(ours) == 1, result.stderr[-2000:]
    assert "fsdp2.yaml asks for FSDP2" in ours[0] and "ddp_cpu.yaml" in ours[0]
    assert list(tmp_path.iterdir()) == []


def test_run_record_keeps_the_precision_used(monkeypatch, capsys, tiny_llama, tmp_path, plain_launch):
    """run.json says what ran (the config says auto); bf16 autocast on CPU really changes the losses."""
    losses = {}
    for precision in ("auto", "bf16"):
        out = tmp_path / precision
        args = ["finetune", "--model", str(tiny_llama), "--task", "dates", "--out", str(out), *QUICK]
        code, _, err = run_cli(monkeypatch, capsys, *args, f"train.mixed_precision={precision}")
        assert code == 0, err
        record = json.loads((out / "run.json").read_text())
        assert record["config"]["train"]["mixed_precision"] == precision
        assert record["engine"] == {
            "engine": "single",
            "processes": 1,
            "mixed_precision": "no" if precision == "auto" else "bf16",
        }
        entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        losses[precision] = [entry["loss"] for entry in entries if "loss" in entry]
    assert losses["auto"] != losses["bf16"]
    assert all(abs(a - b) < 0.05 * abs(a) for a, b in zip(losses["auto"], losses["bf16"], strict=True))
