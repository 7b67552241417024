"""lmforge's model preparation under raw FSDP2: `fully_shard` on a 2-rank CPU gloo mesh equals one process.

Accelerate runs FSDP on CUDA only, but the pieces lmforge adds around it (the loss inside a module's forward,
decoder layers found through PEFT and loss wrappers, a frozen teacher sharded with its root group kept
whole) run on CPU under torch's own FSDP2. tests/fsdp2_worker.py takes one AdamW step on 2 ranks, each with
half of a batch of uneven rows; here the same step runs unsharded in this process over the whole batch. The
gathered full state dicts and the saved LoRA adapter must match. One launch, hard timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsdp2_worker
import pytest
import torch
from safetensors.torch import load_file

from lmforge.models.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp2_models")
    make_tiny_llama(folder / "tiny", seed=0)
    make_tiny_llama(folder / "tiny_tied", seed=1, tie_embeddings=True)
    return folder


@pytest.fixture(scope="module")
def sharded(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2_out")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "fsdp2_worker.py"),
        str(models),
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", fsdp2_worker.CASES)
def test_sharded_step_equals_one_process(models, sharded, case):
    """Full fine-tune (tied embedding), LoRA, and distillation from a sharded teacher: same updated weights."""
    expected = fsdp2_worker.step(models, case).state_dict()
    got = load_file(sharded / f"{case}.safetensors")
    assert sorted(got) == sorted(expected)
    before = fsdp2_worker.trainable_model(models, case).state_dict()
    moved = [k for k in expected if not torch.equal(expected[k], before[k])]
    assert moved, "the step changed no weight: the comparison would prove nothing"
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


def test_saved_lora_adapter_is_the_same(models, sharded, tmp_path):
    """The adapter saved from the gathered state dict equals the one saved by the unsharded model."""
    fsdp2_worker.step(models, "lora").save_pretrained(tmp_path / "one")
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(sharded / "lora_adapter" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and any("lora_B" in k for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
