"""bench/distill_vs_trl.py sets both tools up alike: its settings reach lmforge's config and TRL's GKDConfig, and
its student keeps the teacher's first and last layers.

TRL and `datasets` live only in the benchmark's peer virtualenv. To see what the TRL child script hands to
GKDConfig, it runs here unchanged with two recording modules in their place; it loads the tiny models with
transformers as it would, and stops when it builds GKDConfig.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import config as config_io
from lmforge.distill.run import DistillConfig
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import distill_vs_trl

    yield distill_vs_trl
    sys.modules.pop("distill_vs_trl", None)


class _ConfigBuilt(Exception):
    """Raised by the recording GKDConfig: the script has built its training config."""


def trl_config(bench, spec: dict, tmp_path, monkeypatch) -> dict:
    """The keywords the benchmark's TRL child script passes to GKDConfig for `spec`."""
    recorded: dict = {}

    def gkd_config(**kwargs):
        recorded.update(kwargs)
        raise _ConfigBuilt

    gkd = types.ModuleType("trl.experimental.gkd")
    gkd.GKDConfig, gkd.GKDTrainer = gkd_config, None
    datasets = types.ModuleType("datasets")
    datasets.Dataset = types.SimpleNamespace(from_list=list)
    stand_ins = {"trl": types.ModuleType("trl"), "trl.experimental": types.ModuleType("trl.experimental")}
    for name, module in (stand_ins | {"trl.experimental.gkd": gkd, "datasets": datasets}).items():
        monkeypatch.setitem(sys.modules, name, module)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    monkeypatch.setattr(sys, "argv", ["trl_gkd.py", str(spec_file)])
    with pytest.raises(_ConfigBuilt):
        exec(compile(bench.TRL_SCRIPT, "trl_gkd.py", "exec"), {"__name__": "__main__"})
    return recorded


def _spec(bench, args, tiny_llama, tmp_path) -> dict:
    train = [{"prompt": "When?", "completion": "2001-02-03"}]
    return bench.trl_spec(args, "off_policy", tiny_llama, tiny_llama, train, tmp_path)


@pytest.mark.parametrize("flag", [False, True])
def test_trl_gradient_checkpointing_reaches_the_trainer(bench, flag, tiny_llama, tmp_path, monkeypatch):
    args = bench.parse_args(["--trl-gradient-checkpointing"] if flag else [])
    config = trl_config(bench, _spec(bench, args, tiny_llama, tmp_path), tmp_path, monkeypatch)
    assert config["gradient_checkpointing"] is flag
    assert config["gradient_checkpointing_kwargs"] == {"use_reentrant": False}  # as lmforge checkpoints
    assert config["lmbda"] == 0.0 and config["beta"] == bench.BETA and config["max_steps"] == args.steps


@pytest.mark.parametrize(("given", "lmforge", "trl"), [([], 1.0, 1.0), (["--max-grad-norm", "none"], None, 0.0)])
def test_max_grad_norm_reaches_both_tools(bench, given, lmforge, trl, tiny_llama, tmp_path, monkeypatch):
    """Clipping is the same on both sides; 'none' is None for lmforge and 0 (Trainer's 'off') for TRL."""
    args = bench.parse_args(given)
    args.train = 8
    raw = bench.lmforge_config(args, "cached", tiny_llama, tiny_llama, tmp_path / "d.jsonl", tmp_path / "o")
    (tmp_path / "distill.yaml").write_text(json.dumps(raw))  # as the benchmark writes it: JSON is YAML
    config = config_io.load(tmp_path / "distill.yaml", DistillConfig)
    assert config.train.max_grad_norm == lmforge and config.signal.kind == "cached"
    assert config.train.lr == args.lr and config.train.max_steps == args.steps
    assert not config.general.enabled  # TRL trains on task rows only, so lmforge mixes in no general text here
    assert trl_config(bench, _spec(bench, args, tiny_llama, tmp_path), tmp_path, monkeypatch)["max_grad_norm"] == trl


def test_student_keeps_the_teachers_first_and_last_layers(bench, tmp_path):
    teacher = make_tiny_llama(tmp_path / "teacher", layers=5, seed=2)
    student, kept = bench.make_student(teacher, tmp_path / "student", 3)
    assert kept == [0, 1, 4]
    want, got = load_file(teacher / "model.safetensors"), load_file(student / "model.safetensors")
    assert len(got) == len(want) - 2 * 9  # two decoder layers of 9 tensors each are gone
    for name, tensor in got.items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            name = f"model.layers.{kept[int(index)]}.{rest}"
        assert torch.equal(tensor, want[name]), name
    assert load_model(student, device="cpu").model.config.num_hidden_layers == 3
    with pytest.raises(SystemExit, match="1..4"):
        bench.make_student(teacher, tmp_path / "too_many", 5)
