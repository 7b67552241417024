"""Compiled loops for the passes that dominate TIES: the k-th value's count-and-gather, the selection inside
the bracket, and the cut-elect-combine. torch needs six to ten elementwise passes for each; a loop here is one.

Measured on one 16.7M-element task vector of the 1B benchmark (one thread): counting and gathering 0.015 s
against torch's 0.096 s; cutting, electing and combining two inputs 0.04 s against 0.09 s. On bf16 inputs the
bracket holds 8-12% of the entries (their deltas tie in large groups), so the selection inside it, two 16-bit
histograms of the keys' bits, also replaces torch.kthvalue, which copied the keys and made int64 indices (12
bytes per key: 140 MB on a 1B embedding). docs/benchmarks.md (merge, fifth round) has the whole-merge figures.

The arithmetic, and so the bits, are those of the torch code they replace (`sparsify._kth`, `methods._combine`):
the same operations in the same order, one rounding each, no fused multiply-add (tests/test_merge_kernels.py
compares them bit for bit). numba compiles each loop on first use (~0.2 s to import numba, a few seconds to
compile, cached on disk after) and again per input count, the deltas being a tuple whose length is part of
the type. The loops release the GIL, so the engine's worker threads run them side by side. Where numba is
missing (`available()` False) or a tensor is not float32, the torch code runs: same results, slower.
"""

from __future__ import annotations

import math
import threading
from functools import cache

import numpy as np
import torch

ALL_INDICES = (0, 1 << 62)  # a tie interval every flat index is in


@cache
def _numba():
    """numba's njit, or None when numba cannot be imported (imported on first use: ~0.2 s)."""
    try:
        import numba
    except ImportError:
        return None
    return numba.njit(nogil=True, cache=True, error_model="numpy")


def available() -> bool:
    """Whether the compiled loops can run here (numba importable)."""
    return _numba() is not None


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops take these tensors: float32, contiguous, on the CPU."""
    return available() and all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors
    )


def _count_and_gather(x, absolute, low, high, values, positions):
    below = 0
    inside = 0
    capacity = values.size - 1  # the last slot takes the writes past capacity (the caller then falls back)
    for i in range(x.size):
        v = abs(x[i]) if absolute else x[i]
        below += v < low
        slot = min(inside, capacity)
        values[slot] = v
        positions[slot] = i
        inside += not (v < low or v > high)  # NaN is inside, as torch.kthvalue sorts it last
    return below, inside


def _sortable(value):
    """A float32's bits as a uint32 that sorts as the floats do (negatives flipped whole, positives' sign set)."""
    bits = np.uint32(np.float32(value).view(np.uint32))
    return ~bits if bits >> np.uint32(31) else bits | np.uint32(0x80000000)


def _select_kth(keys, rank):
    # The rank-th smallest (0-based) of float32 keys without NaN, by two 16-bit histograms of sortable bits:
    # exact, two passes, no copy (torch.kthvalue copied the keys and made int64 indices: 12 bytes per key).
    counts = np.zeros(65536, np.int64)
    for i in range(keys.size):
        counts[_sortable(keys[i]) >> np.uint32(16)] += 1
    high = 0
    while rank >= counts[high]:
        rank -= counts[high]
        high += 1
    counts[:] = 0
    for i in range(keys.size):
        bits = _sortable(keys[i])
        if bits >> np.uint32(16) == high:
            counts[bits & np.uint32(0xFFFF)] += 1
    low = 0
    while rank >= counts[low]:
        rank -= counts[low]
        low += 1
    for i in range(keys.size):  # the key itself (its bits are known; this returns the float without a bit cast)
        bits = _sortable(keys[i])
        if bits >> np.uint32(16) == high and bits & np.uint32(0xFFFF) == low:
            return keys[i]
    return keys[0]


def _cut_and_weight(d, low, low_first, low_end, high, high_first, high_end, weight, out):
    for i in range(d.size):  # d is the block's view: an offset index (d[start + i]) stopped vectorisation
        key = abs(d[i])
        keep = (key > low) | ((key == low) & (low_first <= i) & (i < low_end))
        keep &= (key < high) | ((key == high) & (high_first <= i) & (i < high_end))
        out[i] = np.float32(d[i] * np.float32(keep)) * weight


def _add(total, part, size):
    for i in range(size):
        total[i] = total[i] + part[i]


def _elect(total, size):
    for i in range(size):
        total[i] = np.float32(1.0) if total[i] >= 0 else np.float32(-1.0)


def _agree(part, sign, weight, mixed, weighted, first, size):
    if first:
        for i in range(size):
            agreed = np.float32(part[i] * sign[i] > 0)
            mixed[i] = part[i] * agreed
            weighted[i] = agreed * weight
    else:
        for i in range(size):
            agreed = np.float32(part[i] * sign[i] > 0)
            mixed[i] = mixed[i] + part[i] * agreed
            weighted[i] = weighted[i] + agreed * weight


def _finish(base, mixed, weighted, normalize, scale, out):
    for i in range(base.size):
        value = mixed[i]
        if normalize:
            value = value / (weighted[i] if weighted[i] != 0 else np.float32(1.0))
        if scale != 1:
            value = value * scale
        out[i] = base[i] + value


def _cut_elect_combine(base, deltas, lows, low_ties, highs, high_ties, weights, offset, normalize, scale):
    # Block by block, input by input: each loop is a simple pass over a cache-sized block, which LLVM
    # vectorises (one loop doing all of it per element ran 5x slower).
    k, n, block = len(deltas), base.size, 4096
    parts = np.empty((k, block), np.float32)
    total, mixed, weighted = np.empty(block, np.float32), np.empty(block, np.float32), np.empty(block, np.float32)
    for start in range(0, n, block):
        size = min(block, n - start)
        shift = offset + start
        for j in range(k):
            low_first, low_end = low_ties[j, 0] - shift, low_ties[j, 1] - shift
            high_first, high_end = high_ties[j, 0] - shift, high_ties[j, 1] - shift
            piece = deltas[j][start : start + size]
            _cut_and_weight(piece, lows[j], low_first, low_end, highs[j], high_first, high_end, weights[j], parts[j])
        total[:size] = parts[0, :size]
        for j in range(1, k):
            _add(total, parts[j], size)
        _elect(total, size)
        for j in range(k):
            _agree(parts[j], total, weights[j], mixed, weighted, j == 0, size)
        _finish(base[start : start + size], mixed, weighted, normalize, scale, deltas[0][start : start + size])


_compiling = threading.Lock()


@cache
def _compiled(name: str):
    """The compiled loop `name`, its helpers compiled first (numba calls compiled functions only)."""
    with _compiling:  # two merge workers may ask at once
        return _compile(name)


def _compile(name: str):
    jit = _numba()
    glob = globals()
    for helper in ("_sortable", "_cut_and_weight", "_add", "_elect", "_agree", "_finish"):
        if not hasattr(glob[helper], "py_func"):
            glob[helper] = jit(glob[helper])
    loops = {"count_and_gather": _count_and_gather, "cut_elect_combine": _cut_elect_combine, "kth": _select_kth}
    return jit(loops[name])


def count_and_gather(
    x: torch.Tensor, absolute: bool, low: float, high: float, capacity: int
) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(how many keys are below `low`, the keys in [low, high] (NaN included), their flat indices ascending)
    of the flat float32 tensor `x`, keys |x| when `absolute`; None when more than `capacity` are inside.
    Room for `capacity` is reserved, but pages past the entries written are never touched."""
    values = np.empty(capacity + 1, np.float32)
    positions = np.empty(capacity + 1, np.int32 if x.numel() < 2**31 else np.int64)
    count = _compiled("count_and_gather")
    below, inside = count(x.numpy(), absolute, np.float32(low), np.float32(high), values, positions)
    if inside > capacity:
        return None
    return int(below), torch.from_numpy(values[:inside]), torch.from_numpy(positions[:inside])


def kth(keys: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-th smallest (0-based) of a flat float32 tensor without NaN, as a 0-dim tensor: the value
    torch.kthvalue(keys, rank + 1) gives (with -0.0 and 0.0 equal, either may be returned)."""
    return torch.tensor(_compiled("kth")(keys.numpy(), rank), dtype=torch.float32)


def cut_elect_combine(base, deltas, cuts, offset: int, weights: list[float], normalize: bool, scale: float) -> None:
    """TIES's cut, weighting, sign election and (normalised) disjoint mean, + base, into deltas[0], in place:
    `methods._combine` with consensus, one pass. `cuts[i]` is a `sparsify.Cut` on |delta| or None (keep all)."""
    lows, highs = np.full(len(deltas), -math.inf, np.float32), np.full(len(deltas), math.inf, np.float32)
    low_ties, high_ties = np.zeros((len(deltas), 2), np.int64), np.zeros((len(deltas), 2), np.int64)
    for j, cut in enumerate(cuts):
        high_ties[j] = ALL_INDICES
        if cut is not None:
            lows[j], low_ties[j] = float(cut.low), cut.low_ties
            if cut.high is not None:
                highs[j], high_ties[j] = float(cut.high), cut.high_ties
    _compiled("cut_elect_combine")(
        base.reshape(-1).numpy(),
        tuple(d.view(-1).numpy() for d in deltas),
        lows,
        low_ties,
        highs,
        high_ties,
        np.array(weights, np.float32),
        offset,
        normalize,
        np.float32(scale),
    )
