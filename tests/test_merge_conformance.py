"""Conformance of `lmforge merge` with mergekit 0.1.5, config by config (bench/merge_conformance.py).

The per-config tests need mergekit in bench/.venv-mergekit: `make test` builds it once (bench/peers.py) and
reuses it. Without it they skip locally and fail under CI=true. mergekit's outputs are cached in a temp
folder, so a rerun costs only lmforge's merges. The checker tests below run everywhere: they feed the
comparison hand-made outputs (naive formulas from the papers) and check that it passes the right ones and
names the tensor of the wrong ones.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import merge_conformance as mc  # noqa: E402
import peers  # noqa: E402
from needs import tool_missing  # noqa: E402

MERGEKIT = peers.MERGEKIT_VENV / "bin" / "python"
# Configs on the 45M-parameter `wide_*` models (16.8M-element tensors) take seconds each: slow tier.
HEAVY = {case for case in mc.config_names() if any(name.startswith("wide") for name in mc.placeholders(case))}
FAST = [case for case in mc.config_names() if case not in HEAVY]


@pytest.fixture(scope="module")
def pool() -> dict[str, Path]:
    return mc.build_models(sorted({name for case in FAST for name in mc.placeholders(case)}))


@pytest.fixture(scope="module")
def mergekit(pool):
    """case -> (mergekit's output, its float32 rerun, error) of the fast configs, merged in one mergekit process."""
    if peers.installed_version(MERGEKIT, "mergekit") != "0.1.5":
        tool_missing("mergekit 0.1.5 is not in bench/.venv-mergekit: `make test` (or python bench/peers.py) builds it")
    return mc.mergekit_outputs(FAST, pool, MERGEKIT)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in HEAVY else c for c in mc.config_names()]
)
def test_same_tensors_as_mergekit(case, pool, mergekit, tmp_path):
    if case in HEAVY:
        pool = mc.build_models(mc.placeholders(case))
        mergekit = mc.mergekit_outputs([case], pool, MERGEKIT)
    mk_dir, ref_dir, error = mergekit[case]
    assert error is None, error
    error = mc.run_lmforge(case, pool, tmp_path / "out")
    assert error is None, error
    report = mc.compare(case, pool, tmp_path / "out", mk_dir, ref_dir)
    assert report.tensors > 0
    assert report.ok, report.describe()


# ---------------------------------------------------------------- the checker itself (no mergekit needed)


def _write(folder: Path, like: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    shutil.copy(like / "config.json", folder / "config.json")
    return folder


def _inputs(pool, *names):
    return [mc.read_tensors(pool[name]) for name in names]


def test_exact_mode_names_the_tensor_that_differs(pool, tmp_path):
    a, b = _inputs(pool, "ft_a", "ft_b")
    soup = {k: (0.6 * a[k] + 0.4 * b[k]) / 1.0 for k in a}  # linear.yaml, from the definition
    theirs = _write(tmp_path / "theirs", pool["base"], soup)
    assert mc.compare("linear", pool, theirs, theirs).ok
    name = "model.layers.1.self_attn.q_proj.weight"
    off = dict(soup)
    off[name] = soup[name].clone()
    off[name].view(-1)[7] += 1e-5 * soup[name].abs().max()
    report = mc.compare("linear", pool, _write(tmp_path / "ours", pool["base"], off), theirs)
    assert [(i.tensor, i.elements) for i in report.issues] == [(name, 1)]
    assert report.issues[0].value == pytest.approx(1e-5, rel=1e-3)


def test_rounded_mode_allows_one_rounding_and_no_more(pool, tmp_path):
    a, b = _inputs(pool, "rand_a", "rand_b")
    exact = {k: 0.6 * a[k] + 0.4 * b[k] for k in a}  # mkt_linear.yaml in float32
    reference = _write(tmp_path / "reference", pool["base"], exact)
    rounded = {k: v.to(torch.bfloat16) for k, v in exact.items()}
    ours = _write(tmp_path / "ours", pool["base"], rounded)
    assert mc.compare("mkt_linear", pool, ours, ours, reference).ok
    name = "model.embed_tokens.weight"
    off = dict(rounded)
    off[name] = rounded[name].clone()
    off[name].view(torch.int16).view(-1)[3] += 1  # the next bfloat16 away from zero: one step off
    report = mc.compare("mkt_linear", pool, _write(tmp_path / "off", pool["base"], off), ours, reference)
    assert [i.tensor for i in report.issues] == [name]
    assert 0.5 < report.issues[0].value <= 1.5


def test_ties_excuses_only_magnitudes_tied_at_the_cut():
    config = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"density": 0.5}}]}
    inputs = {"b": {"w": torch.zeros(4)}, "m": {"w": torch.tensor([4.0, -2.0, 2.0, 1.0])}}
    assert mc.tie_excuses(config, "w", inputs).tolist() == [False, True, True, False]
    inputs["m"]["w"] = torch.tensor([4.0, -3.0, 2.0, 1.0])
    assert mc.tie_excuses(config, "w", inputs) is None


def _dare(pool, models, weights, density, rescale, elect, ramp=0.0, seed=0):
    """base + sum of w * rescaled Bernoulli-masked task vectors, signs elected (DARE / DELLA, the papers' formulas).

    normalize is off, as in dare_linear and dare_ties; della's normalize divides the single weight back out,
    so its test passes weight 1.
    """
    generator = torch.Generator().manual_seed(seed)
    base = mc.read_tensors(pool["base"])
    tuned = [mc.read_tensors(pool[model]) for model in models]
    out = {}
    for name, b in base.items():
        parts = []
        for model, w, d in zip(tuned, weights, density, strict=True):
            delta = model[name] - b
            p = mc.keep_probability(delta, "della", d, ramp).float() if ramp else torch.full_like(delta, d)
            kept = delta * torch.bernoulli(p, generator=generator)
            scale = delta.abs().sum() / kept.abs().sum() if rescale == "l1" else 1 / d
            parts.append(w * kept * scale)
        stack = torch.stack(parts)
        if elect:
            stack = stack * (stack.sign() == torch.where(stack.sum(0) >= 0, 1.0, -1.0))
        out[name] = b + stack.sum(0)
    return out


@pytest.mark.parametrize(
    ("case", "models", "weights", "density", "rescale", "elect", "ramp", "flagged"),
    [
        ("dare_linear", ["ft_a"], [0.7], [0.4], "l1", False, 0.0, None),
        ("dare_linear", ["ft_a"], [0.7], [0.4], "inverse", False, 0.0, "is not the L1 ratio"),
        ("dare_ties", ["ft_a", "ft_anti"], [1, 1], [0.66, 0.5], "l1", True, 0.0, None),
        ("dare_ties", ["ft_a", "ft_anti"], [1, 1], [0.66, 0.5], "l1", False, 0.0, "not one multiple of one task"),
        ("della", ["ft_a"], [1], [0.5], "l1", True, 0.2, None),
        ("della", ["ft_a"], [1], [0.5], "l1", True, 0.0, "upper half of the magnitude ranks"),
    ],
)
def test_invariants_pass_the_papers_formulas_and_catch_departures(
    pool, tmp_path, case, models, weights, density, rescale, elect, ramp, flagged
):
    ours = _write(tmp_path / "ours", pool["base"], _dare(pool, models, weights, density, rescale, elect, ramp))
    report = mc.compare(case, pool, ours, ours)
    if flagged is None:
        assert report.ok, report.describe()
    else:
        assert flagged in " | ".join(i.problem for i in report.issues), report.describe()
