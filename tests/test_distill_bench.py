"""bench/distill_vs_trl.py can run TRL with gradient checkpointing, for a like-for-like ratio when lmforge uses it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import distill_vs_trl

    yield distill_vs_trl
    sys.modules.pop("distill_vs_trl", None)


@pytest.mark.parametrize("flag", [False, True])
def test_trl_gradient_checkpointing_reaches_the_trainer(bench, flag, tmp_path):
    args = bench.parse_args(["--trl-gradient-checkpointing"] if flag else [])
    assert args.trl_gradient_checkpointing is flag
    spec = bench.trl_spec(args, "off_policy", tmp_path / "t", tmp_path / "s", [], tmp_path)
    assert spec["gradient_checkpointing"] is flag
    # the TRL child reads it from the spec, and checkpoints as lmforge does (non-reentrant)
    assert 'gradient_checkpointing=spec["gradient_checkpointing"]' in bench.TRL_SCRIPT
    assert '"use_reentrant": False' in bench.TRL_SCRIPT


@pytest.mark.parametrize(("given", "lmforge", "trl"), [([], 1.0, 1.0), (["--max-grad-norm", "none"], None, 0.0)])
def test_max_grad_norm_reaches_both_tools(bench, given, lmforge, trl, tmp_path):
    """Clipping is the same on both sides; 'none' is None for lmforge and 0 (Trainer's 'off') for TRL."""
    args = bench.parse_args(given)
    args.train = 8
    config = bench.lmforge_config(args, "cached", tmp_path / "t", tmp_path / "s", tmp_path / "d", tmp_path / "o")
    assert config["train"]["max_grad_norm"] == lmforge
    spec = bench.trl_spec(args, "off_policy", tmp_path / "t", tmp_path / "s", [], tmp_path)
    assert (spec["max_grad_norm"] or 0.0) == trl
    assert 'max_grad_norm=spec["max_grad_norm"] or 0.0' in bench.TRL_SCRIPT
