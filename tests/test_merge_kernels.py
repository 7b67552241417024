"""The compiled TIES loops (lmforge/merge/kernels.py) give the torch code's bits, and the torch code runs
without them."""

from __future__ import annotations

import pytest
import torch

from lmforge.merge import kernels, methods, sparsify

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


@pytest.fixture
def torch_only(monkeypatch):
    """Run the torch code even where the compiled loops could."""

    def use_torch():
        monkeypatch.setattr(kernels, "fits", lambda *tensors: False)

    return use_torch


def _task_vector(n: int, seed: int) -> torch.Tensor:
    """Deltas of bf16 weights, as a real bf16 merge has: many exactly equal magnitudes, a NaN-free tensor."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator).bfloat16().float()
    tuned = (base + 0.01 * torch.randn(n, generator=generator)).bfloat16().float()
    return tuned - base


@pytest.mark.parametrize("key", [torch.abs, sparsify._identity])
@pytest.mark.parametrize("share", [0.5, 0.1, 0.999])
def test_kth_value_counts_and_ties_are_the_torch_codes(key, share, torch_only):
    values = _task_vector(1_200_000, seed=3)
    k = int(share * values.numel())
    compiled = sparsify._kth(values, k, key)
    torch_only()
    reference = sparsify._kth(values, k, key)
    assert compiled[0].item() == reference[0].item() and compiled[1:3] == reference[1:3]
    if reference[3] is not None:
        assert torch.equal(compiled[3].long(), reference[3])


def test_kth_selection_equals_kthvalue_with_ties_zeros_and_infinities():
    cases = [
        _task_vector(300_000, seed=1),
        torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf")] * 500),
        torch.randint(-40, 40, (100_001,)).float() / 8,
    ]
    for keys in cases:
        for rank in (0, keys.numel() // 3, keys.numel() - 1):
            assert kernels.kth(keys, rank).item() == torch.kthvalue(keys, rank + 1).values.item()


@pytest.mark.parametrize("inputs", [1, 2, 3])
@pytest.mark.parametrize(("normalize", "scale"), [(True, 1.0), (True, 0.7), (False, 1.0), (False, 1.3)])
def test_cut_elect_combine_is_bit_identical_to_torch(inputs, normalize, scale, torch_only):
    n = 700_000
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    deltas = [_task_vector(n, seed=10 + i) for i in range(inputs)]
    deltas[0][5] = float("nan")  # NaN survives as NaN, as in torch (NaN * 0)
    cuts = [sparsify.magnitude_cut(d, 0.4) for d in deltas]
    if inputs == 3:
        cuts[2] = None  # an input kept whole
    weights = [0.5, 0.3, 0.9][:inputs]
    shared = {"normalize": normalize, "lambda": scale}
    for offset in (0, 1234):  # a row chunk of a larger tensor: the tie intervals shift
        compiled = [d.clone() for d in deltas]
        methods._combine(base, compiled, cuts, offset, weights, True, shared)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "fits", lambda *tensors: False)
            reference = [d.clone() for d in deltas]
            methods._combine(base, reference, cuts, offset, weights, True, shared)
        assert torch.equal(compiled[0].nan_to_num(7.0), reference[0].nan_to_num(7.0))
        assert torch.isnan(compiled[0][5])


def test_a_full_gather_budget_falls_back_to_torch():
    values = torch.ones(400_000)  # every key equal: the bracket holds them all
    assert kernels.count_and_gather(values, True, 1.0, 1.0, capacity=1000) is None
    value, below, equal, _ = sparsify._kth(values, 200_000, torch.abs)
    assert value.item() == 1.0 and below == 0 and equal == 400_000


def test_ties_merges_the_same_without_numba(tmp_path, monkeypatch):
    """The engine's output is the same bits with the compiled loops and with torch alone."""
    from merge_helpers import family, weights

    from lmforge.merge.run import merge

    base, a, b = family(tmp_path / "models", 3)
    config = {
        "models": [{"model": str(m), "parameters": {"density": 0.5, "weight": 0.5}} for m in (a, b)],
        "merge_method": "ties",
        "base_model": str(base),
        "dtype": "float32",
    }
    merge(config, tmp_path / "compiled", progress=False)
    monkeypatch.setattr(kernels, "fits", lambda *tensors: False)
    merge(config, tmp_path / "torch", progress=False)
    first, second = weights(tmp_path / "compiled"), weights(tmp_path / "torch")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
