"""Every merge method against an independent naive version written from its paper (or mergekit's documented
semantics): `CASES` maps each METHODS name to its check, and one test runs over METHODS, so a method added
without a check fails. The sparsifications under the random methods are also checked against their invariants."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.merge import sparsify
from lmforge.merge.engine import generator_for
from lmforge.merge.methods import METHODS, Inputs

SHAPE = (37, 29)


def _tensors(count: int, seed: int = 0, scale: float = 0.3) -> list[torch.Tensor]:
    """A base and `count - 1` fine-tune-like variants of it (continuous values: no ties at any cut-off)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    return [base] + [base + scale * torch.randn(SHAPE, generator=g) for _ in range(count - 1)]


def _run(name: str, tensors, base, shared=None, per_input=None, seed: int = 0) -> torch.Tensor:
    method = METHODS[name]
    defaults = {p.name: p.default for p in method.params if p.scope == "shared" and p.default is not None}
    per_input = per_input or [{} for _ in tensors]
    x = Inputs(
        [t.clone() for t in tensors], base, defaults | (shared or {}), per_input, lambda i: generator_for(seed, "w", i)
    )
    return method.fn(x)


def _top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * delta.numel()))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.argsort(delta.abs().flatten(), descending=True)[:k]] = True
    return keep.view_as(delta)


def linear_is_the_weighted_average():
    a, b, c = _tensors(3)
    got = _run("linear", [a, b, c], None, per_input=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}])
    torch.testing.assert_close(got, (a + 2 * b + 0.5 * c) / 3.5)
    raw = _run("linear", [a, b], None, {"normalize": False}, [{"weight": 0.5}, {"weight": 0.25}])
    torch.testing.assert_close(raw, 0.5 * a + 0.25 * b)


def task_arithmetic_adds_scaled_task_vectors():
    base, a, b = _tensors(3)
    per = [{}, {"weight": 0.7, "density": 1.0}, {"weight": -0.2, "density": 1.0}]
    got = _run("task_arithmetic", [base, a, b], 0, {"lambda": 0.5}, per)
    torch.testing.assert_close(got, base + 0.5 * (0.7 * (a - base) - 0.2 * (b - base)))


def _elect(weighted: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES's merge of weighted task vectors: the sign of their sum wins, entries of the other sign are
    dropped, and the rest summed (divided by the agreeing inputs' weights with `normalize`)."""
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == sign for t in weighted]
    total = sum(t * m for t, m in zip(weighted, agree, strict=True))
    if not normalize:
        return total
    divisor = sum(w * m for w, m in zip(weights, agree, strict=True))
    return total / torch.where(divisor == 0, 1.0, divisor)


def ties_trims_elects_and_averages_the_agreeing():
    base, a, b, c = _tensors(4)
    weights = [0.6, 0.3, 0.9]
    for density in (0.2, 0.5, 1.0):
        trimmed = [w * (t - base) * _top_k_mask(t - base, density) for w, t in zip(weights, (a, b, c), strict=True)]
        want = base + _elect(trimmed, weights, normalize=True)
        per = [{}] + [{"weight": w, "density": density} for w in weights]
        torch.testing.assert_close(_run("ties", [base, a, b, c], 0, per_input=per), want)


def _outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the top gamma share of |delta| (outliers), keep the density share below it."""
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    order = torch.argsort(delta.abs().flatten())
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n - target - top : n - top]] = True
    return keep.view_as(delta)


def breadcrumbs_drops_outliers_and_small_values():
    base, a = _tensors(2)
    delta = a - base
    want = base + 0.8 * delta * _outliers_mask(delta, 0.5, 0.1)
    per = [{}, {"weight": 0.8, "density": 0.5, "gamma": 0.1}]
    torch.testing.assert_close(_run("breadcrumbs", [base, a], 0, per_input=per), want)


def breadcrumbs_ties_elects_signs_of_the_trimmed_vectors():
    base, a, b = _tensors(3)
    weights = [0.8, 0.5]
    trimmed = [w * (t - base) * _outliers_mask(t - base, 0.5, 0.1) for w, t in zip(weights, (a, b), strict=True)]
    want = base + _elect(trimmed, weights, normalize=False)  # breadcrumbs_ties does not normalize by default
    per = [{}] + [{"weight": w, "density": 0.5, "gamma": 0.1} for w in weights]
    torch.testing.assert_close(_run("breadcrumbs_ties", [base, a, b], 0, per_input=per), want)


def slerp_follows_the_great_circle_and_lerps_when_colinear():
    a, b = _tensors(2, scale=2.0)
    t = 0.3
    theta = math.acos(float((a / a.norm() * (b / b.norm())).sum()))
    want = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    torch.testing.assert_close(_run("slerp", [a, b], 0, {"t": t}), want)
    torch.testing.assert_close(_run("slerp", [a, 2 * a], 0, {"t": t}), (1 - t) * a + t * 2 * a)


def nuslerp_interpolates_task_vectors_by_weight_ratio():
    base, a, b = _tensors(3)
    va, vb = (a - base).flatten(), (b - base).flatten()
    t = 3.0 / (1.0 + 3.0)
    theta = math.acos(float((va / va.norm() * (vb / vb.norm())).sum()))
    want = base + ((math.sin((1 - t) * theta) * va + math.sin(t * theta) * vb) / math.sin(theta)).view(SHAPE)
    per = [{}, {"weight": 1.0}, {"weight": 3.0}]
    torch.testing.assert_close(_run("nuslerp", [base, a, b], 0, per_input=per), want)


def multislerp_of_two_unit_vectors_is_their_slerp():
    a, b = _tensors(2, scale=1.0)
    a, b = a / a.norm(), b / b.norm()
    got = _run("multislerp", [a, b], None, per_input=[{"weight": 1.0}, {"weight": 1.0}])
    middle = (a + b) / (a + b).norm()  # the spherical midpoint; both norms are 1
    torch.testing.assert_close(got, middle, atol=1e-5, rtol=1e-4)


def model_stock_uses_the_angle_between_fine_tunes():
    base, a, b = _tensors(3)
    da, db = (a - base).flatten(), (b - base).flatten()
    cos = float(da @ db / (da.norm() * db.norm()))
    t = 2 * cos / (1 + cos)
    want = t * (a + b) / 2 + (1 - t) * base
    torch.testing.assert_close(_run("model_stock", [base, a, b], 0), want)


def karcher_mean_of_two_directions_is_the_midpoint_scaled_by_mean_norm():
    a, b = _tensors(2, scale=1.0)
    direction = (a / a.norm() + b / b.norm()) / (a / a.norm() + b / b.norm()).norm()
    want = direction * (a.norm() + b.norm()) / 2
    torch.testing.assert_close(_run("karcher", [a, b], None), want, atol=1e-5, rtol=1e-4)


def nearswap_blends_toward_the_other_model_where_close():
    a, b = _tensors(2)
    t = 0.1
    weight = (t / (a - b).abs()).clamp(0, 1)
    torch.testing.assert_close(_run("nearswap", [a, b], 0, {"t": t}), weight * b + (1 - weight) * a)


def sce_selects_by_variance_and_weights_by_energy():
    base, a, b = _tensors(3)
    tv = torch.stack([a - base, b - base])
    var = tv.var(dim=0, unbiased=False)
    k = int(var.numel() * 0.5)
    keep = torch.zeros(var.numel(), dtype=torch.bool)
    keep[torch.argsort(var.flatten(), descending=True)[:k]] = True
    tv = tv * keep.view_as(var)
    energy = tv.square().flatten(1).mean(1)
    energy = energy / energy.sum()
    sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    w = energy.view(-1, 1, 1) * (torch.sign(tv) == sign)
    want = base + (tv * w).sum(0) / w.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(_run("sce", [base, a, b], 0, {"select_topk": 0.5}), want)


def arcee_fusion_takes_the_changes_above_the_importance_fence():
    base, tuned = _tensors(2)
    kl = []
    for row_base, row_tuned in zip(base, tuned, strict=True):  # KL of the two rows' softmaxes, row by row
        p, q = torch.softmax(row_tuned, 0) + 1e-8, torch.softmax(row_base, 0) + 1e-8
        kl.append(float(sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))))
    importance = (tuned - base).abs() * torch.tensor(kl).unsqueeze(1)
    ordered = sorted(importance.flatten().tolist())
    q1, median, q3 = (ordered[int(q * (len(ordered) - 1))] for q in (0.25, 0.5, 0.75))
    take = importance >= median + 1.5 * (q3 - q1)
    got = _run("arcee_fusion", [base, tuned], 0)
    torch.testing.assert_close(got, torch.where(take, tuned, base))
    assert 0 < int(take.sum()) < take.numel() // 4  # only the outliers of importance move


def _ram_naive(tensors: list[torch.Tensor], epsilon: float, r: float | None = None, alpha: float = 0.2):
    """Element by element: changes above epsilon; one changer keeps its change (times its RAM+ scale),
    several average theirs."""
    base, deltas = tensors[0], [t - tensors[0] for t in tensors[1:]]
    changed = [(d.abs() > epsilon).flatten().tolist() for d in deltas]
    flat = [d.flatten().tolist() for d in deltas]
    n = base.numel()
    scales = [1.0] * len(deltas)
    if r is not None:
        for i, mine in enumerate(changed):
            shared = sum(1 for j in range(n) if mine[j] and sum(c[j] for c in changed) > 1)
            unique = sum(1 for j in range(n) if mine[j] and sum(c[j] for c in changed) == 1)
            scales[i] = 1 + r * min(max(shared / max(unique, epsilon), 0), alpha)
    out = []
    for j in range(n):
        movers = [i for i in range(len(deltas)) if changed[i][j]]
        if len(movers) == 1:
            out.append(flat[movers[0]][j] * scales[movers[0]])
        else:
            out.append(sum(flat[i][j] for i in movers) / max(len(movers), 1))
    return base + torch.tensor(out).view_as(base)


def ram_keeps_unique_changes_and_averages_shared_ones():
    tensors = _tensors(4, scale=0.02)  # std 0.02 deltas against epsilon 0.02: unique, shared and no changes
    got = _run("ram", tensors, 0, {"epsilon": 0.02})
    torch.testing.assert_close(got, _ram_naive(tensors, 0.02))
    assert not torch.allclose(got, _run("linear", tensors[1:], None, per_input=[{"weight": 1.0}] * 3))


def ramplus_tl_scales_unique_changes_by_the_shared_ratio():
    tensors = _tensors(3, scale=0.02)
    got = _run("ramplus_tl", tensors, 0, {"epsilon": 0.02, "r": 0.5, "alpha": 0.6})
    torch.testing.assert_close(got, _ram_naive(tensors, 0.02, r=0.5, alpha=0.6))
    assert not torch.allclose(got, _run("ram", tensors, 0, {"epsilon": 0.02}))


def passthrough_scales_or_copies():
    (a,) = _tensors(1)
    torch.testing.assert_close(_run("passthrough", [a], None, per_input=[{"scale": None}]), a)
    torch.testing.assert_close(_run("passthrough", [a], None, per_input=[{"scale": 0.0}]), torch.zeros_like(a))


def test_dare_keeps_about_density_and_rescales():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(300, 400, generator=g)
    for mode in ("l1", "density"):
        kept = sparsify.bernoulli(delta.clone(), 0.3, True, generator_for(0, "x", 1), mode)
        share = float((kept != 0).float().mean())
        assert abs(share - 0.3) < 0.01
        if mode == "l1":  # mergekit: the kept values carry the original L1 mass
            torch.testing.assert_close(kept.abs().sum(), delta.abs().sum())
        else:  # the paper: each kept value divided by the keep probability
            torch.testing.assert_close(kept[kept != 0], delta[kept != 0] / 0.3)


def _l1_rescaled(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept entries, scaled so their L1 norm is the whole task vector's (mergekit's rescale)."""
    kept = delta * keep
    return kept * (delta.abs().sum() / kept.abs().sum())


def _dare(delta: torch.Tensor, density: float, model: int) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, one uniform draw per entry from the input's generator."""
    keep = torch.rand(delta.numel(), generator=generator_for(0, "w", model)) < density
    return _l1_rescaled(delta, keep.view_as(delta))


def _della(delta: torch.Tensor, density: float, epsilon: float, model: int) -> torch.Tensor:
    """DELLA's MagPrune: per row, the keep probability rises linearly with |delta|'s rank, density -+ epsilon."""
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).to(delta.dtype)
    probs = density - epsilon + 2 * epsilon * ranks / (delta.shape[1] - 1)
    keep = torch.rand(delta.shape, generator=generator_for(0, "w", model)) < probs
    return _l1_rescaled(delta, keep)


def dare_ties_elects_one_sign_per_entry():
    base, a, b = _tensors(3, scale=1.0)
    per = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    merged = _run("dare_ties", [base, a, b], 0, per_input=per) - base
    kept = [_dare(a - base, 0.5, 1), _dare(b - base, 0.5, 2)]
    torch.testing.assert_close(merged, _elect(kept, [1.0, 1.0], normalize=False), atol=1e-6, rtol=1e-5)
    sign = torch.where(sum(kept) >= 0, 1.0, -1.0)
    assert ((merged * sign) >= -1e-6).all()  # no entry keeps the minority sign


def dare_linear_adds_the_weighted_rescaled_draws():
    base, a, b = _tensors(3)
    per = [{}, {"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.7}]
    want = base + 0.6 * _dare(a - base, 0.3, 1) + 0.4 * _dare(b - base, 0.7, 2)
    torch.testing.assert_close(_run("dare_linear", [base, a, b], 0, per_input=per), want, atol=1e-6, rtol=1e-5)


def della_elects_and_averages_the_magnitude_pruned():
    base, a, b = _tensors(3)
    weights = [0.7, 0.5]
    per = [{}] + [{"weight": w, "density": 0.4, "epsilon": 0.2} for w in weights]
    kept = [w * _della(t - base, 0.4, 0.2, i) for i, (w, t) in enumerate(zip(weights, (a, b), strict=True), 1)]
    want = base + _elect(kept, weights, normalize=True)
    torch.testing.assert_close(_run("della", [base, a, b], 0, per_input=per), want, atol=1e-6, rtol=1e-5)


def della_linear_adds_the_weighted_magnitude_pruned():
    base, a, b = _tensors(3)
    per = [{}, {"weight": 0.7, "density": 0.4, "epsilon": 0.2}, {"weight": 0.5, "density": 0.6, "epsilon": 0.1}]
    want = base + 0.7 * _della(a - base, 0.4, 0.2, 1) + 0.5 * _della(b - base, 0.6, 0.1, 2)
    torch.testing.assert_close(_run("della_linear", [base, a, b], 0, per_input=per), want, atol=1e-6, rtol=1e-5)


def test_della_prefers_large_magnitudes():
    delta = torch.linspace(-1, 1, 4001).repeat(50, 1)
    kept = sparsify.della_magprune(delta.clone(), 0.5, 0.4, False, generator_for(0, "d", 1), "l1")
    small, large = delta.abs() < 0.2, delta.abs() > 0.8
    assert abs(float((kept != 0).float().mean()) - 0.5) < 0.02
    assert float((kept[large] != 0).float().mean()) > float((kept[small] != 0).float().mean()) + 0.4


def test_generator_is_keyed_by_seed_tensor_and_model():
    draw = lambda *key: torch.rand(4, generator=generator_for(*key))  # noqa: E731
    assert torch.equal(draw(0, "a", 1), draw(0, "a", 1))
    assert not torch.equal(draw(0, "a", 1), draw(0, "a", 2))
    assert not torch.equal(draw(0, "a", 1), draw(1, "a", 1))
    assert not torch.equal(draw(0, "a", 1), draw(0, "b", 1))


def test_rank_mask_is_exact_with_ties():
    values = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 0.0] * 70_000)  # large enough for sample-select
    order = torch.sort(values, stable=True).indices
    for start, stop in ((0, 200_000), (100_000, 420_000), (419_999, 420_000)):
        want = torch.zeros(values.numel(), dtype=torch.bool)
        want[order[start:stop]] = True
        assert torch.equal(sparsify.rank_mask(values, start, stop), want)
    assert sparsify.kth_smallest(values, 350_001) == torch.kthvalue(values, 350_001).values


def test_rank_cut_on_row_chunks_equals_the_whole_mask():
    # ties at both cut-offs, in several chunks, so the index intervals of the kept ties cross chunk borders
    values = torch.tensor([3.0, -1.0, 3.0, 2.0, -3.0, 0.0, 1.0] * 60_000)
    n = values.numel()
    for start, stop in ((0, n // 3), (n // 5, n - n // 7), (n - 1, n), (n // 2, n // 2 + 1), (1_000, 1_002)):
        whole = sparsify.rank_mask(values, start, stop, torch.abs)
        cut = sparsify.rank_cut(values, start, stop, torch.abs)
        chunks = [sparsify.apply(cut, values[a : a + 50_001], a) for a in range(0, n, 50_001)]
        assert torch.equal(torch.cat(chunks), whole) and int(whole.sum()) == stop - start
        kept = values.clone()
        for a in range(0, n, 50_001):
            sparsify.keep(kept[a : a + 50_001], cut, a)
        assert torch.equal(kept, values * whole)


def test_rank_cut_finds_ties_by_a_pass_when_too_many_to_gather(monkeypatch):
    values = torch.tensor([3.0, -1.0, 3.0, 2.0, -3.0, 0.0, 1.0] * 60_000)
    n = values.numel()
    gathered = sparsify.rank_cut(values, n // 5, n - n // 7, torch.abs)
    monkeypatch.setattr(sparsify, "TIE_POSITIONS", 10)
    assert sparsify.rank_cut(values, n // 5, n - n // 7, torch.abs) == gathered


def test_dare_mask_drawn_piece_by_piece_is_one_whole_draw():
    delta = torch.randn(sparsify.CHUNK * 2 + 17)
    want = delta * (torch.rand(delta.numel(), generator=generator_for(0, "t", 1)) < 0.3)
    got = sparsify.bernoulli(delta.clone(), 0.3, False, generator_for(0, "t", 1), "l1")
    assert torch.equal(got, want)


CASES = {
    "linear": linear_is_the_weighted_average,
    "task_arithmetic": task_arithmetic_adds_scaled_task_vectors,
    "ties": ties_trims_elects_and_averages_the_agreeing,
    "dare_ties": dare_ties_elects_one_sign_per_entry,
    "dare_linear": dare_linear_adds_the_weighted_rescaled_draws,
    "breadcrumbs": breadcrumbs_drops_outliers_and_small_values,
    "breadcrumbs_ties": breadcrumbs_ties_elects_signs_of_the_trimmed_vectors,
    "della": della_elects_and_averages_the_magnitude_pruned,
    "della_linear": della_linear_adds_the_weighted_magnitude_pruned,
    "slerp": slerp_follows_the_great_circle_and_lerps_when_colinear,
    "nuslerp": nuslerp_interpolates_task_vectors_by_weight_ratio,
    "multislerp": multislerp_of_two_unit_vectors_is_their_slerp,
    "model_stock": model_stock_uses_the_angle_between_fine_tunes,
    "karcher": karcher_mean_of_two_directions_is_the_midpoint_scaled_by_mean_norm,
    "nearswap": nearswap_blends_toward_the_other_model_where_close,
    "sce": sce_selects_by_variance_and_weights_by_energy,
    "passthrough": passthrough_scales_or_copies,
    "arcee_fusion": arcee_fusion_takes_the_changes_above_the_importance_fence,
    "ram": ram_keeps_unique_changes_and_averages_shared_ones,
    "ramplus_tl": ramplus_tl_scales_unique_changes_by_the_shared_ratio,
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_matches_its_naive_reference(name):
    assert name in CASES, f"merge method {name!r} has no naive reference in CASES: write one"
    CASES[name]()
