"""Merge methods: pure tensor functions in one dict, `METHODS`, keyed and parameterised as mergekit names them.

Each entry is a `Method`: the function, its parameters (name, type, scope, default) and which inputs it
takes (base required / optional / ignored, input counts). A function receives `Inputs`: float32 (or
float64) tensors of one output tensor, the index of the base among them, the shared parameters and one
parameter dict per input, and returns the merged tensor in the same precision; the engine rounds once to
the output dtype. Functions may reuse their input tensors' storage (the engine hands them fresh copies).
The task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) is one function and a
table of rows, as in mergekit's generalized task arithmetic [mk]. References: each row's `reference`.
`elementwise` methods may be computed on row chunks of a tensor (huge embeddings) with the same result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from lmforge.merge import kernels, sparsify

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter: `scope` is shared (one value), input (every input) or non_base (every non-base input)."""

    name: str
    type: type
    scope: str = "shared"
    default: object = REQUIRED


@dataclass
class Inputs:
    """What a method sees for one output tensor."""

    tensors: list[torch.Tensor]
    base: int | None
    shared: dict
    per_input: list[dict]
    generator: Callable[[int], torch.Generator] = field(default=lambda i: torch.Generator())
    """A seeded generator for input i, keyed by (seed, tensor name, model), for random methods."""
    cuts: list[sparsify.Cut | sparsify.Draw | None] | None = None
    """Per input, its whole-tensor cut or draw (`Method.cut`, `Method.draw`), when the tensors are a row chunk."""
    offset: int = 0
    """Flat index of the chunk's first element in the whole tensor (with `cuts`)."""

    @property
    def others(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base]


@dataclass(frozen=True)
class Method:
    """A merge method: its function, parameter spec and input contract (mergekit's MergeMethodSpec)."""

    fn: Callable[[Inputs], torch.Tensor]
    params: tuple[Param, ...]
    base: str = "ignored"
    """required | optional | ignored (the base model, if any, is then one more input)."""
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None
    elementwise: bool = False
    cut: Callable[[torch.Tensor, dict], sparsify.Cut | None] | None = None
    """(task vector, input parameters) -> the input's sparsification cut, for methods whose only whole-tensor
    step is a per-input rank cut (TIES, breadcrumbs without rescale): cuts come first, one input at a time,
    then row chunks with `Inputs.cuts`, so a huge tensor is never held whole for every input at once."""
    draw: Callable[..., sparsify.Draw] | None = None
    """(a task vector's rows as (flat offset, rows) pieces, the offsets of the row chunks to redraw, its row
    count, input parameters, shared parameters, generator) -> its random sparsification (`sparsify.draw`),
    for methods whose whole-tensor steps are a random mask and its L1 rescale (DARE, DELLA): draws come
    first, streamed, then row chunks redraw the same bits."""
    reference: str = ""


def linear(x: Inputs) -> torch.Tensor:
    """Weighted average (model soups, Wortsman et al. 2022): sum w_i x_i, divided by sum w_i if normalize."""
    weights = [p["weight"] for p in x.per_input]
    out = x.tensors[0].mul_(weights[0])
    for tensor, weight in zip(x.tensors[1:], weights[1:], strict=True):
        out.add_(tensor, alpha=weight)
    # the denominator is summed in float32, as mergekit's weight tensor is
    return out.div_(torch.tensor(weights, dtype=out.dtype).sum()) if x.shared["normalize"] else out


def task_arithmetic_family(x: Inputs, sparsification: str | None, consensus: bool) -> torch.Tensor:
    """base + lambda * combine(w_i * sparsify(x_i - base)); TIES sign election when `consensus`.

    Sparsifications that need the whole task vector (random draws, the L1 rescale) run first, on each
    task vector; a rank cut is only taken there, and applied with the rest block by block (`_combine`).
    """
    base = x.tensors[x.base]
    if not x.others:
        return base
    deltas, cuts, weights = [], [], []
    rescale, mode = x.shared["rescale"], x.shared.get("rescale_mode", "l1")
    for i in x.others:
        p = x.per_input[i]
        delta, cut = x.tensors[i].sub_(base), None
        if x.cuts is not None and isinstance(x.cuts[i], sparsify.Draw):  # a row chunk of a random sparsification
            delta = sparsify.redraw(delta, x.cuts[i], x.offset, sparsification, p, rescale, mode)
        elif x.cuts is not None:  # a row chunk: the cuts were taken on the whole task vector
            cut = x.cuts[i]
        elif sparsification in _CUTS and not rescale:
            cut = _CUTS[sparsification](delta, p)
        elif sparsification == "magnitude":
            delta = sparsify.magnitude(delta, p["density"], rescale)
        elif sparsification == "magnitude_outliers":
            delta = sparsify.magnitude_outliers(delta, p["density"], p["gamma"], rescale)
        elif sparsification == "random":
            delta = sparsify.bernoulli(delta, p["density"], rescale, x.generator(i), mode)
        elif sparsification == "della_magprune":
            delta = sparsify.della_magprune(delta, p["density"], p["epsilon"], rescale, x.generator(i), mode)
        deltas.append(delta)
        cuts.append(cut)
        weights.append(p["weight"])
    _combine(base, deltas, cuts, x.offset, weights, consensus, x.shared)
    return deltas[0]


def _combine(base, deltas, cuts, offset: int, weights: list[float], consensus: bool, shared: dict) -> None:
    """Cut, weight and combine the deltas into deltas[0], in place, one cache-sized block at a time:
    TIES sign election, normalize, lambda, + base.

    Every step is elementwise, so blocks of `sparsify.BLOCK` elements keep each pass in the cache (a
    16.7M-element TIES tensor: 2x faster than in 4M-element chunks). Masks are 0/1 floats, as comparisons
    into float are vectorised and comparisons into bool are not; the arithmetic, and so the bits, are those
    of bool masks (d * 1.0 and d * 0.0 as d * True and d * False; base + mixed / divisor as addcdiv).
    """
    on_magnitudes = all(cut is None or cut.key is torch.abs for cut in cuts)
    if consensus and on_magnitudes and kernels.fits(base, *deltas):  # the same arithmetic, one compiled pass
        kernels.cut_elect_combine(base, deltas, cuts, offset, weights, shared["normalize"], shared["lambda"])
        return
    flat_base, flats = base.view(-1), [d.view(-1) for d in deltas]
    n, dtype = flat_base.numel(), base.dtype
    mask, total, agree, divisor = (torch.empty(min(sparsify.BLOCK, n), dtype=dtype) for _ in range(4))
    normalize, scale = shared["normalize"], shared["lambda"]
    if not consensus:
        summed = torch.tensor(weights, dtype=dtype).sum()  # summed in the tensors' precision, as mergekit does
        scalar_divisor = summed if summed.abs() >= 1e-8 else torch.ones((), dtype=dtype)
    for start in range(0, n, sparsify.BLOCK):
        parts = [d[start : start + sparsify.BLOCK] for d in flats]
        size = parts[0].numel()
        for part, cut, weight in zip(parts, cuts, weights, strict=True):
            if cut is not None:
                part.mul_(sparsify.apply(cut, part, offset + start, out=mask[:size]))
            part.mul_(weight)
        mixed = parts[0]
        if consensus:
            # the sign of the summed weighted deltas wins (+1 where the sum is >= 0); other signs are dropped
            majority = torch.add(parts[0], parts[1], out=total[:size]) if len(parts) > 1 else total[:size].copy_(mixed)
            for part in parts[2:]:
                majority.add_(part)
            majority = torch.ge(majority, 0, out=majority).mul_(2).sub_(1)
            weighted = None
            for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
                # 1 where the delta has the majority's sign (0 for zeros and NaN, as sign(d) == majority)
                agreed = torch.gt(torch.mul(part, majority, out=agree[:size]), 0, out=agree[:size])
                part.mul_(agreed)
                if i:
                    mixed.add_(part)
                if normalize and i == 0:
                    weighted = torch.mul(agreed, weight, out=divisor[:size])
                elif normalize:
                    weighted.add_(agreed, alpha=weight)
            if normalize:
                weighted.add_(torch.eq(weighted, 0, out=agree[:size]))  # no input agrees: divide by 1
        else:
            for part in parts[1:]:
                mixed.add_(part)
            weighted = scalar_divisor
        if normalize and scale == 1:
            torch.addcdiv(flat_base[start : start + size], mixed, weighted, out=mixed)  # one rounding each, as below
            continue
        if normalize:
            mixed.div_(weighted)
        if scale != 1:
            mixed.mul_(scale)
        mixed.add_(flat_base[start : start + size])


class ParameterError(ValueError):
    """A parameter value a method cannot use; the planner turns it into a UserError naming the tensor."""


SLERP_CHUNK = 1 << 20  # mergekit reduces norms and dots in chunks of this many elements; so do we, to match its bits


def slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor, threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors; lerp when nearly colinear.

    Norms are norms of per-chunk norms and the dot product is a sum of per-chunk dots of the normalised
    vectors, all in float32 with t as a float32 scalar, exactly as mergekit computes them: near-colinear
    fine-tunes make the angle sensitive to the last bit of the dot product.
    """
    shape = a.shape
    a, b = a.reshape(1, -1), b.reshape(1, -1)
    t = torch.tensor([[t]], dtype=a.dtype)
    chunks = [slice(i, i + SLERP_CHUNK) for i in range(0, a.shape[1], SLERP_CHUNK)]
    norm_a = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(a[:, c], dim=1, keepdim=True) for c in chunks]), dim=0
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(b[:, c], dim=1, keepdim=True) for c in chunks]), dim=0
    )
    norm_a, norm_b = torch.where(norm_a > 1e-8, norm_a, 1), torch.where(norm_b > 1e-8, norm_b, 1)
    buffer_a, buffer_b = (torch.empty(1, min(SLERP_CHUNK, a.shape[1]), dtype=a.dtype) for _ in range(2))
    dots = []
    for c in chunks:  # a / |a| * (b / |b|) in two reused buffers: the same roundings, no fresh temporaries
        width = a[:, c].shape[1]
        unit_a = torch.div(a[:, c], norm_a, out=buffer_a[:, :width])
        dots.append(unit_a.mul_(torch.div(b[:, c], norm_b, out=buffer_b[:, :width])).sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0)
    dot = dot.clamp(-1, 1)
    linear = dot.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
    coef_b = torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta))
    for c in chunks:  # in place, chunk by chunk: coef_a * a + coef_b * b, rounded as written, one temporary
        a[:, c].mul_(coef_a).add_(torch.mul(b[:, c], coef_b, out=buffer_b[:, : a[:, c].shape[1]]))
    return a.reshape(shape)


def slerp(x: Inputs) -> torch.Tensor:
    """SLERP from the base (t=0) to the other model (t=1) (Shoemake 1985)."""
    return slerp_vectors(x.shared["t"], x.tensors[x.base], x.tensors[x.others[0]])


def nuslerp(x: Inputs) -> torch.Tensor:
    """SLERP of two models' tensors (or task vectors, with a base) by weight ratio, per row or flattened."""
    first, second = x.others
    w0, w1 = x.per_input[first]["weight"], x.per_input[second]["weight"]
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    base = x.tensors[x.base] if x.base is not None else None
    v0, v1 = x.tensors[first], x.tensors[second]
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    shape = v0.shape
    if x.shared["nuslerp_flatten"]:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif x.shared["nuslerp_row_wise"]:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if not x.shared["nuslerp_flatten"] and x.shared["nuslerp_row_wise"]:
        out = out.transpose(0, -1)
    out = out.reshape(shape)
    return out + base if base is not None else out


def multislerp(x: Inputs) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere through the tangent space at the weighted mean."""
    others = x.others
    if len(others) == 1:
        return x.tensors[others[0]]
    base = x.tensors[x.base] if x.base is not None else None
    eps = x.shared["eps"]
    flat = torch.stack([x.tensors[i].reshape(-1) for i in others])
    if base is not None:
        flat -= base.reshape(1, -1)
    weights = torch.tensor([x.per_input[i]["weight"] for i in others], dtype=flat.dtype)
    if x.shared["normalize_weights"]:
        weights = weights / weights.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    if mean.norm() < eps:
        if len(others) != 2:
            raise ParameterError("the weighted sum of the input tensors is zero (antipodal inputs): change the weights")
        out = flat[0] * weights[0] + flat[1] * weights[1]
    else:
        mean = mean / mean.norm()
        tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
        length = tangent.norm() + eps
        out = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * weights).sum()
    out = out.view(x.tensors[0].shape)
    return out + base if base is not None else out


def model_stock(x: Inputs) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): interpolate base and the average by t = N cos / (1 + (N-1) cos)."""
    base, models = x.tensors[x.base], [x.tensors[i] for i in x.others]
    shape = base.shape
    if x.shared["filter_wise"]:
        base = base.unsqueeze(0) if base.dim() == 1 else base
        models = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        base, models = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [m - base for m in models]
    cosines = [
        ((a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
        for i, a in enumerate(offsets)
        for b in offsets[i + 1 :]
    ]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(models)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    average = sum(models) / n
    return (t * average + (1 - t) * base).reshape(shape)


def karcher(x: Inputs) -> torch.Tensor:
    """Weighted Riemannian (Karcher) mean of the directions on the unit sphere, scaled by the mean norm."""
    tensors, tol = x.tensors, x.shared["tol"]
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [t.norm() for t in tensors]
    units = [t / n if n.item() != 0 else torch.zeros_like(t) for t, n in zip(tensors, norms, strict=True)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [units[i] for i in valid]
    mean = sum(w * u for w, u in zip(weights, units, strict=True))
    mean = units[0].clone() if mean.norm().item() < tol else mean / mean.norm()
    for _ in range(x.shared["max_iter"]):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            dot = torch.dot(mean.flatten(), u.flatten()).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        length = tangent.norm()
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        if mean.norm().item() > tol:
            mean = mean / mean.norm()
    return sum(a * n for a, n in zip(alphas, norms, strict=True)) * mean


def nearswap(x: Inputs) -> torch.Tensor:
    """Take the other model's value where it is within t of the base, blending smoothly further out."""
    a, b = x.tensors[x.base], x.tensors[x.others[0]]
    weight = (x.shared["t"] / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


def sce(x: Inputs) -> torch.Tensor:
    """SCE (Wan et al. 2024): select high-variance elements, weight task vectors by energy, erase minority signs."""
    base = x.tensors[x.base]
    if not x.others:
        return base
    vectors = torch.stack([x.tensors[i] - base for i in x.others])
    topk = x.shared["select_topk"]
    if topk < 1:
        variance = vectors.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(variance).item() * topk) if topk > 0 else 0
        mask = sparsify.rank_mask(variance.abs(), variance.numel() - k, variance.numel())
        vectors = vectors * mask
    majority = torch.where(vectors.sum(dim=0) >= 0, 1.0, -1.0)
    erase = vectors.sign() == majority
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = energy.sum().item()
    energy = torch.full_like(energy, 1 / len(energy)) if abs(total) < 1e-6 else energy / total
    weights = energy.view(-1, *([1] * base.dim())) * erase
    return base + (vectors * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)


def arcee_fusion(x: Inputs) -> torch.Tensor:
    """Arcee Fusion: take the fine-tune's value only where its change is important, else keep the base.

    Importance is |ft - base| times the row's KL(softmax(ft) || softmax(base)) over the last dimension; an
    element is taken when its importance reaches median + 1.5 IQR of all importances (Tukey's outlier fence).
    Quantiles are the sorted importances at index floor(q (n - 1)), as mergekit computes them, but exact for
    every size: mergekit samples 1M elements of larger tensors with an unseeded draw (not reproducible).
    """
    base, tuned = x.tensors[x.base], x.tensors[x.others[0]]
    p = torch.softmax(tuned, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1): one divergence per row
    importance = (tuned - base).abs().mul_(kl).reshape(-1)
    # float32 index arithmetic as mergekit's (q * (n - 1)).long(), so the same elements are read
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (importance.numel() - 1)).long().tolist()
    q1, median, q3 = (sparsify.kth_smallest(importance, rank + 1) for rank in ranks)
    keep = importance.view_as(base) >= median + 1.5 * (q3 - q1)
    return base + (tuned - base) * keep


def _ram_task_vectors(x: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task vectors (k, n) zeroed where |tv| <= epsilon, that mask, how many inputs change each element (1, n))."""
    base = x.tensors[x.base]
    vectors = torch.stack([x.tensors[i] - base for i in x.others]).view(len(x.others), -1)
    changed = vectors.abs() > x.shared["epsilon"]
    return vectors * changed, changed, changed.sum(dim=0, keepdim=True)


def ram(x: Inputs) -> torch.Tensor:
    """RAM (Reinforced Agent Merging): a change made by one input is kept whole, shared ones are averaged.

    Elements an input changes by at most `epsilon` count as unchanged, so a sparse (RL-style) update is not
    diluted by the inputs that left the element alone, as a plain average would.
    """
    base = x.tensors[x.base]
    if not x.others:
        return base
    vectors, _, counts = _ram_task_vectors(x)
    merged = (vectors * (counts == 1) + vectors * (counts > 1) / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(x: Inputs) -> torch.Tensor:
    """RAM+ (tensor-local): as RAM, with each input's unique changes scaled up by 1 + r min(rho, alpha), rho being
    its shared-to-unique changed-element ratio in this tensor (mergekit's tensor-local reading of the paper)."""
    base = x.tensors[x.base]
    if not x.others:
        return base
    vectors, changed, counts = _ram_task_vectors(x)
    unique, overlap = counts == 1, counts > 1
    rho = (changed & overlap).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=x.shared["epsilon"])
    scale = 1 + x.shared["r"] * rho.clamp(min=0, max=x.shared["alpha"])  # (k,)
    merged = (vectors * unique * scale.unsqueeze(-1) + vectors * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def passthrough(x: Inputs) -> torch.Tensor:
    """Copy the one input, optionally scaled (frankenmerges, layer stacking, zeroed projections)."""
    scale = x.per_input[0]["scale"]
    return x.tensors[0] if scale is None else x.tensors[0].mul_(scale)


_TA_PARAMS = (
    Param("int8_mask", bool, default=False),
    Param("lambda", float, default=1.0),
    Param("rescale_mode", str, default="l1"),
    Param("weight", float, "non_base"),
    Param("density", float, "non_base", 1.0),
)


def _task_arithmetic_row(sparsification, consensus, normalize, rescale, reference, extra=()) -> Method:
    params = (Param("normalize", bool, default=normalize), Param("rescale", bool, default=rescale))
    return Method(
        partial(task_arithmetic_family, sparsification=sparsification, consensus=consensus),
        params + _TA_PARAMS + extra,
        base="required",
        elementwise=sparsification is None and not consensus,
        cut=_CUTS.get(sparsification),
        draw=partial(_draw, sparsification) if sparsification in ("random", "della_magprune") else None,
        reference=reference,
    )


# Rank cuts by sparsification; the engine uses them only where `rescale` is off (the L1 rescale sums the
# whole tensor in one reduction, to match mergekit's bits).
_CUTS = {
    "magnitude": lambda delta, p: sparsify.magnitude_cut(delta, p["density"]),
    "magnitude_outliers": lambda delta, p: sparsify.outliers_cut(delta, p["density"], p["gamma"]),
}


def _draw(sparsification: str, chunks, starts, rows: int, p: dict, shared: dict, generator) -> sparsify.Draw:
    rescale, mode = shared["rescale"], shared.get("rescale_mode", "l1")
    return sparsify.draw(chunks, starts, rows, sparsification, p, rescale, mode, generator)


_GAMMA = (Param("gamma", float, "non_base", 0.01),)
_EPSILON = (Param("epsilon", float, "non_base", 0.15),)
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_DELLA = "https://arxiv.org/abs/2406.11617"

METHODS: dict[str, Method] = {
    "linear": Method(
        linear,
        (Param("weight", float, "input"), Param("normalize", bool, default=True)),
        elementwise=True,
        reference="https://arxiv.org/abs/2203.05482",
    ),
    "task_arithmetic": _task_arithmetic_row(None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": _task_arithmetic_row("magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": _task_arithmetic_row("random", True, False, True, _DARE),
    "dare_linear": _task_arithmetic_row("random", False, False, True, _DARE),
    "breadcrumbs": _task_arithmetic_row("magnitude_outliers", False, False, False, _BREADCRUMBS, _GAMMA),
    "breadcrumbs_ties": _task_arithmetic_row("magnitude_outliers", True, False, False, _BREADCRUMBS, _GAMMA),
    "della": _task_arithmetic_row("della_magprune", True, True, True, _DELLA, _EPSILON),
    "della_linear": _task_arithmetic_row("della_magprune", False, False, True, _DELLA, _EPSILON),
    "slerp": Method(
        slerp,
        (Param("t", float),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        reference="https://en.wikipedia.org/wiki/Slerp",
    ),
    "nuslerp": Method(
        nuslerp,
        (
            Param("weight", float, "non_base"),
            Param("nuslerp_row_wise", bool, default=False),
            Param("nuslerp_flatten", bool, default=True),
        ),
        base="optional",
        min_non_base=2,
        max_non_base=2,
    ),
    "multislerp": Method(
        multislerp,
        (
            Param("weight", float, "non_base"),
            Param("normalize_weights", bool, default=True),
            Param("eps", float, default=1e-8),
        ),
        base="optional",
        min_non_base=1,
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    "model_stock": Method(
        model_stock,
        (Param("filter_wise", bool, default=False),),
        base="required",
        min_inputs=3,
        reference="https://arxiv.org/abs/2403.19522",
    ),
    "karcher": Method(
        karcher,
        (Param("max_iter", int, default=10), Param("tol", float, default=1e-5)),
        reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    ),
    "nearswap": Method(
        nearswap,
        (Param("t", float),),
        base="required",
        min_inputs=2,
        max_inputs=2,
        elementwise=True,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    "sce": Method(
        sce,
        (Param("int8_mask", bool, default=False), Param("select_topk", float, default=1.0)),
        base="required",
        reference="https://arxiv.org/abs/2408.07990",
    ),
    "passthrough": Method(passthrough, (Param("scale", float, "input", None),), max_inputs=1, elementwise=True),
    "arcee_fusion": Method(arcee_fusion, (), base="required", min_inputs=2, max_inputs=2, reference="https://arcee.ai"),
    "ram": Method(
        ram, (Param("epsilon", float, default=1e-5),), base="required", reference="https://arxiv.org/abs/2601.13572"
    ),
    "ramplus_tl": Method(
        ramplus_tl,
        (Param("r", float, default=0.1), Param("alpha", float, default=0.2), Param("epsilon", float, default=1e-5)),
        base="required",
        reference="https://arxiv.org/abs/2601.13572",
    ),
}

ALL_PARAMETER_NAMES = frozenset(p.name for m in METHODS.values() for p in m.params)
