"""Two processes (torchrun, gloo on CPU) give the same losses and weights as one with twice the accumulation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.models.tiny import make_tiny_llama

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(out: Path, processes: int, batch: int, accum: int) -> tuple[list[dict], dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        str(WORKER),
        str(out),
        str(batch),
        str(accum),
    ]
    # CPU ranks (gloo) even where a GPU is visible: NCCL refuses two ranks on one GPU, and the sums are the point
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "history.json").read_text()), load_file(out / "weights.safetensors")


def test_two_processes_equal_one_with_double_accumulation(tmp_path):
    two_history, two_weights = run(tmp_path / "two", processes=2, batch=2, accum=2)
    one_history, one_weights = run(tmp_path / "one", processes=1, batch=2, accum=4)
    assert [h["tokens"] for h in two_history] == [h["tokens"] for h in one_history]
    assert [h["loss"] for h in two_history] == pytest.approx([h["loss"] for h in one_history], rel=1e-5)
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, atol=1e-5, rtol=1e-4)
    initial = load_file(make_tiny_llama(tmp_path / "initial", seed=0) / "model.safetensors")
    assert any(not torch.equal(initial[name], value) for name, value in two_weights.items() if name in initial)
