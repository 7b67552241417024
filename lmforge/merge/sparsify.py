"""Sparsification of task vectors: magnitude (TIES), outlier-trimmed magnitude (breadcrumbs), random (DARE),
magnitude-ranked random (DELLA).

Same semantics as mergekit's `sparsify.py` (density, gamma, epsilon, and its "rescale" that matches the L1
norm of the kept values to the original's), with two differences. Rank cut-offs come from sample-select
k-th values (O(n)) instead of a full argsort, and are kept as a `Cut` of a few numbers: entries tied exactly
at a cut-off are taken in index order, so exactly k are kept (which tied entries mergekit keeps is
unspecified: the only place results can differ), and a cut taken on a whole tensor applies to its row
chunks. Random masks draw from a `torch.Generator` the caller keys by (seed, tensor, model), piece by
piece in order (the same bits as one draw), so a merge gives the same bits whatever the order or thread
count; a task vector too big to hold whole is drawn in two passes (`draw`, `redraw`) with those bits.
`rescale_mode="density"` gives the papers' 1/p rescaling instead of the L1 match
(DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099; DELLA, Deep et al. 2024,
https://arxiv.org/abs/2406.11617).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.merge import kernels

L1_EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled


CHUNK = 1 << 22  # elements per pass-through piece: the keys (e.g. |delta|) never exist for a whole tensor
BLOCK = 1 << 17  # elements per cache-sized block (512 KB of float32): elementwise passes stay in L2
SAMPLE = 1 << 14  # sample size of the k-th value selection (sorting a larger one cost more than it saved)
TIE_POSITIONS = 1 << 22  # bracket entries whose flat indices are kept (beyond it, ties are found by a pass)


def _pieces(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


def _identity(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return x


def kth_smallest(values: torch.Tensor, k: int, key=_identity) -> torch.Tensor:
    """The exact k-th smallest (1-based) of key(values) for a flat tensor, by sample-select, not sorting."""
    return _kth(values, k, key)[0]


def _kth(values: torch.Tensor, k: int, key=_identity) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
    """(k-th smallest of key(values), how many keys are below it, how many equal it, the flat indices of
    those equal, ascending, or None if not gathered), for a flat tensor.

    A fixed random sample brackets the k-th value with a margin of 4 standard deviations of the sample rank
    (a 1-sigma margin missed a third of the time, and a miss costs a whole-tensor `kthvalue`); one counting
    pass (block by block, so key(values) is never whole) checks the bracket and gathers the few values
    inside it, with their flat indices, for `torch.kthvalue`. The counts and the tied entries' indices come
    from the same pass, so the cut needs no pass of its own. Comparisons write float 0/1 flags: torch
    vectorises those, not comparisons into bool (measured 4x slower).
    """
    n = values.numel()
    if n <= 1 << 18:
        return _whole_kth(values, k, key)
    picks = torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(n))
    low, high, capacity = _bracket(key(values[picks]).sort().values, k, n)
    counted = None
    if kernels.fits(values) and key in (_identity, torch.abs):
        counted = kernels.count_and_gather(values, key is torch.abs, float(low), float(high), capacity)
    below, inside, where = counted or _count_and_gather(values, key, low, high)
    if not below < k <= below + inside.numel():  # the sample missed (or NaN keys): select on the whole tensor
        return _whole_kth(values, k, key)
    return _select(inside, where, below, k)


def _bracket(sample: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(low, high) around the k-th of n from a sorted sample, 4 sigma of the sample rank either side, and room
    for 4x the entries expected inside (a compiled count's budget; pages past those written are never touched)."""
    share = (k - 1) / n
    middle, margin = share * SAMPLE, int(4 * (SAMPLE * share * (1 - share)) ** 0.5) + 16
    low = sample[max(0, int(middle) - margin)]
    high = sample[min(SAMPLE - 1, int(middle) + margin)]
    return low, high, 4 * (2 * margin + 1) * (n // SAMPLE + 1) + 1024


def _select(inside: torch.Tensor, where: torch.Tensor | None, below: int, k: int) -> tuple:
    """`_kth`'s answer from the bracket's keys (and their flat indices): value, below, equal, tied indices."""
    if kernels.fits(inside) and not bool(torch.isnan(inside).any()):
        value = kernels.kth(inside, k - below - 1)
    else:
        value = torch.kthvalue(inside, k - below).values
    tied = inside == value
    positions = where[tied] if where is not None else None
    return value, below + int(torch.count_nonzero(inside < value)), int(torch.count_nonzero(tied)), positions


def _count_and_gather(values: torch.Tensor, key, low, high) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(keys below `low`, the keys in [low, high] with NaN, their flat indices or None past TIE_POSITIONS):
    `_kth`'s counting pass in torch, block by block, so key(values) is never whole."""
    n = values.numel()
    below, inside, where, gathered = 0, [], [], 0
    # buffers made once: the loop's only allocations are the small pieces it keeps (see `draw`)
    flags, other, buffer = (torch.empty(min(BLOCK, n), dtype=values.dtype) for _ in range(3))
    for offset in range(0, n, BLOCK):
        size = min(BLOCK, n - offset)
        keys = key(values[offset : offset + size], out=buffer[:size])
        under = torch.lt(keys, low, out=flags[:size])
        below += int(under.sum())  # exact: a float32 sum of at most 2^16 ones
        # inside = neither below low nor above high (NaN keys count as inside, as kthvalue sorts them last)
        outside = under.add_(torch.gt(keys, high, out=other[:size]))
        found = torch.nonzero(torch.eq(outside, 0, out=other[:size])).view(-1)
        inside.append(keys[found])
        gathered += found.numel()
        if gathered <= TIE_POSITIONS:
            where.append(found.add_(offset))
    return below, torch.cat(inside), torch.cat(where) if gathered <= TIE_POSITIONS else None


def _whole_kth(values: torch.Tensor, k: int, key) -> tuple[torch.Tensor, int, int, None]:
    keys = key(values)
    value = torch.kthvalue(keys, k).values
    return value, int(torch.count_nonzero(keys < value)), int(torch.count_nonzero(keys == value)), None


@dataclass(frozen=True)
class Cut:
    """The entries of a rank range [start, stop) of key(values), in a few numbers instead of a mask.

    An entry is kept when low < key < high, or when key equals a boundary value and its flat index is in
    that boundary's [first, end): ties at a cut-off are taken in index order, so the kept run of tied
    entries is one index interval. Applying a cut to a row chunk needs only the chunk's flat offset, which
    is how TIES runs on row chunks of tensors too big to hold whole (see `apply`).
    """

    low: torch.Tensor
    low_ties: tuple[int, int]
    high: torch.Tensor | None  # None: no upper bound
    high_ties: tuple[int, int]
    key: Callable[[torch.Tensor], torch.Tensor] = _identity


def rank_cut(values: torch.Tensor, start: int, stop: int, key=_identity) -> Cut:
    """The Cut keeping the entries whose ascending rank of key(value) is in [start, stop) (0 < start < stop <= n)."""
    flat = values.reshape(-1)
    n = flat.numel()
    low, below, equal, tied = _kth(flat, start + 1, key)
    low_ties = _tie_interval(flat, low, start - below, stop - below, equal, key, tied)
    high, high_ties = None, (0, 0)
    if stop < n:
        high, below, equal, tied = _kth(flat, stop, key)
        # a range all tied at one value keeps key <= high, and the low boundary's interval picks the ties
        high_ties = (0, n) if bool(high == low) else _tie_interval(flat, high, 0, stop - below, equal, key, tied)
    return Cut(low, low_ties, high, high_ties, key)


def _tie_interval(flat, value, first: int, stop: int, equal: int, key, tied=None) -> tuple[int, int]:
    """The flat-index interval of the tied entries (key == value) of tie ranks [first, stop), in index order
    (`tied`: their flat indices, ascending, when the selection gathered them; else one pass finds them)."""
    first, stop = max(0, first), min(equal, stop)
    if first >= stop:
        return (0, 0)
    if first == 0 and stop == equal:
        return (0, flat.numel())  # every tied entry is kept: no index pass
    if tied is not None:
        return (int(tied[first]), int(tied[stop - 1]) + 1)
    wanted, found, seen = [first, stop - 1], [], 0
    for offset, piece in zip(range(0, flat.numel(), CHUNK), _pieces(flat), strict=True):
        tied = key(piece) == value
        count = int(torch.count_nonzero(tied))
        while wanted and wanted[0] < seen + count:
            found.append(offset + int(tied.nonzero()[wanted.pop(0) - seen]))
        seen += count
    return (found[0], found[1] + 1)


def apply(cut: Cut, values: torch.Tensor, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask of `cut` on `values`, flat elements [offset, offset + numel) of the cut tensor: boolean,
    or 0/1 in `out`'s dtype (a float mask is 4x faster to make and to multiply by than a bool one)."""
    keys = cut.key(values.reshape(-1))
    n = keys.numel()
    # a chunk inside a boundary's tie interval keeps all its ties there: one comparison, no fix-up
    low_all = cut.low_ties[0] <= offset and offset + n <= cut.low_ties[1]
    high_all = cut.high_ties[0] <= offset and offset + n <= cut.high_ties[1]
    mask = torch.ge(keys, cut.low, out=out) if low_all else torch.gt(keys, cut.low, out=out)
    scratch = torch.empty_like(mask)
    if cut.high is not None:
        mask.mul_(torch.le(keys, cut.high, out=scratch) if high_all else torch.lt(keys, cut.high, out=scratch))
    boundaries = [] if low_all else [(cut.low, cut.low_ties)]
    boundaries += [] if cut.high is None or high_all else [(cut.high, cut.high_ties)]
    for value, (first, end) in boundaries:
        a, b = max(first - offset, 0), min(end - offset, n)
        if a < b:  # tied entries are outside the strict comparisons above: adding them is an exact "or"
            mask[a:b].add_(torch.eq(keys[a:b], value, out=scratch[a:b]))
    return mask.view(values.shape)


def l1(values: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """values.abs().sum(), mergekit's reduction (so rescaled values match bit for bit), with |values| in
    `scratch` when given: one buffer for the norms before and after masking, allocated before the mask's
    pieces, so the second norm does not find the first one's block split by them (100 MB more RSS in DARE)."""
    return torch.abs(values, out=scratch).sum() if scratch is not None else values.abs().sum()


def rescale_l1(before: torch.Tensor, masked: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Scale `masked` in place so its L1 norm is `before` (the unmasked tensor's): mergekit's rescale."""
    after = l1(masked, scratch)
    if before >= L1_EPS and after >= L1_EPS:
        masked.mul_(before / after)
    return masked


def rank_mask(values: torch.Tensor, start: int, stop: int, key=_identity) -> torch.Tensor:
    """Boolean mask of the entries whose ascending rank of key(value) is in [start, stop): exactly stop - start.

    Entries tied with a boundary value are taken in index order, so the count is exact as with mergekit's
    sort (which of the tied entries it keeps is unspecified there).
    """
    if stop <= start:
        return torch.zeros(values.shape, dtype=torch.bool)
    cut = rank_cut(values, start, stop, key)
    flat = values.reshape(-1)
    mask = torch.empty(flat.numel(), dtype=torch.bool)
    for offset, piece, out in zip(range(0, flat.numel(), CHUNK), _pieces(flat), _pieces(mask), strict=True):
        apply(cut, piece, offset, out=out)
    return mask.view(values.shape)


def keep(delta: torch.Tensor, cut: Cut | None, offset: int = 0) -> torch.Tensor:
    """delta *= the cut's mask, in place, block by block (`offset`: delta's first flat index in the cut tensor).

    The mask is 0/1 in delta's dtype, one block at a time: the product keeps mergekit's NaN * 0 = NaN and
    the bits of a multiplication by a bool mask (masked_fill is 4x slower, and zeroes NaN).
    """
    if cut is None:
        return delta
    flat = delta.view(-1)
    scratch = torch.empty(min(BLOCK, flat.numel()), dtype=delta.dtype)
    for start in range(0, flat.numel(), BLOCK):
        piece = flat[start : start + BLOCK]
        piece.mul_(apply(cut, piece, offset + start, out=scratch[: piece.numel()]))
    return delta


KEEP_NOTHING = Cut(torch.tensor(float("inf")), (0, 0), None, (0, 0))


def magnitude_cut(delta: torch.Tensor, density: float) -> Cut | None:
    """TIES's cut: the `density` share of largest-magnitude entries (at least one); None keeps everything."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return None
    return rank_cut(delta, n - max(1, int(density * n)), n, torch.abs)


def outliers_cut(delta: torch.Tensor, density: float, gamma: float) -> Cut | None:
    """Breadcrumbs's cut: drop the `gamma` share of largest magnitudes, then the smallest, keeping `density`."""
    n = delta.numel()
    if density >= 1:
        return None
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    return rank_cut(delta, bottom, bottom + target, torch.abs) if target > 0 else KEEP_NOTHING


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the `density` share of largest-magnitude entries (at least one), zero the rest (in place)."""
    cut = magnitude_cut(delta, density)
    if cut is None:
        return delta
    scratch = torch.empty_like(delta) if rescale else None
    before = l1(delta, scratch) if rescale else None
    keep(delta, cut)
    return rescale_l1(before, delta, scratch) if rescale else delta


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Drop the `gamma` share of largest magnitudes, then the smallest, keeping `density` of the entries."""
    cut = outliers_cut(delta, density, gamma)
    if cut is None:
        return delta
    scratch = torch.empty_like(delta) if rescale else None
    before = l1(delta, scratch) if rescale else None
    keep(delta, cut)
    return rescale_l1(before, delta, scratch) if rescale else delta


def bernoulli(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator, mode: str
) -> torch.Tensor:
    """DARE: keep each entry with probability `density`; rescale by L1 match (mergekit) or 1/p (paper)."""
    if density >= 1:
        return delta
    scratch = torch.empty_like(delta) if rescale else None
    before = l1(delta, scratch) if rescale else None
    _bernoulli_keep(delta, density, generator)
    if not rescale:
        return delta
    return delta.div_(density) if mode == "density" else rescale_l1(before, delta, scratch)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator, mode: str
) -> torch.Tensor:
    """DELLA: per row, keep probability rises linearly with magnitude rank from density-eps to density+eps."""
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(width, dtype=rows.dtype).expand_as(rows).contiguous())
    # mergekit's (rank - min) / (max - min) with 1-based ranks is rank / (width - 1) for 0-based ranks
    probs = (density - epsilon) + (ranks / max(width - 1, 1)).clamp_(0, 1) * (2 * epsilon)
    keep = torch.rand(rows.shape, generator=generator, dtype=torch.float32) < probs
    before = delta.abs().sum() if rescale else None
    kept = (rows * keep).view_as(delta)
    if not rescale:
        return kept
    return kept.div_(probs.view_as(delta)) if mode == "density" else rescale_l1(before, kept)


def _bernoulli_keep(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """delta *= (uniform draw < density), in place, drawn block by block: the same bits as one whole draw
    (one number per element, in order), with no float32 tensor of noise the size of the delta."""
    flat = delta.view(-1)
    noise = torch.empty(min(BLOCK, flat.numel()), dtype=torch.float32)
    for start in range(0, flat.numel(), BLOCK):
        piece = flat[start : start + BLOCK]
        drawn = torch.rand(piece.numel(), generator=generator, dtype=torch.float32, out=noise[: piece.numel()])
        piece.mul_(torch.lt(drawn, density, out=drawn))  # a 0/1 float mask: the bits of a bool one, 4x faster
    return delta


@dataclass(frozen=True)
class Draw:
    """A random sparsification of a task vector too big to hold whole, drawn chunk by chunk (`draw`) and
    redrawn on each chunk (`redraw`): the generator's state at each chunk's first flat index, so a chunk
    gets the bits one whole draw would give it, and the factor that rescales the kept entries."""

    states: dict[int, torch.Tensor]
    scale: float | None
    """The L1 match, before / after (float64); None: not rescaled this way."""


def draw(chunks, starts, rows: int, sparsification: str, p: dict, rescale: bool, mode: str, generator) -> Draw:
    """Pass 1 of a random sparsification: draw it on (flat offset, task vector rows) pairs, in order, keeping
    the generator's state at each offset in `starts` (the row chunks to redraw); `rows`: the tensor's rows.

    mergekit sums each L1 norm in one float32 reduction. Here each row's |values| are summed in float64
    (a row is never split, and torch sums a row alike however many rows it is given), then the row sums
    in one reduction: the factor does not depend on how the rows were chunked, and is as accurate or
    more, though not bit for bit the whole-tensor path's (DARE/DELLA masks are random: they conform by
    invariants). Nothing allocated in the loop outlives it but the few states: a small block kept between
    freed buffers would split the heap's free space (measured: 300 MB more peak RSS in a 135M merge).
    """
    states, l1_match = {}, rescale and mode == "l1"
    if p["density"] >= 1:
        return Draw(states, None)
    sums = torch.zeros(2, rows, dtype=torch.float64) if l1_match else None  # |before| and |after| per row
    row = 0
    for offset, delta in chunks:
        if offset in starts:
            states[offset] = generator.get_state()
        if l1_match:
            _row_l1(delta, sums[0, row : row + delta.shape[0]])
        kept = _random_keep(delta, sparsification, p, generator, rescale and mode == "density")
        if l1_match:
            _row_l1(kept, sums[1, row : row + delta.shape[0]])
        row += delta.shape[0]
    if not l1_match:
        return Draw(states, None)
    before, after = (float(s) for s in sums.sum(dim=1))
    return Draw(states, before / after if before >= L1_EPS and after >= L1_EPS else None)


def _row_l1(rows: torch.Tensor, out: torch.Tensor) -> None:
    torch.sum(rows.reshape(rows.shape[0], -1).abs(), dim=1, dtype=torch.float64, out=out)


def redraw(
    delta: torch.Tensor, drawn: Draw, offset: int, sparsification: str, p: dict, rescale: bool, mode: str
) -> torch.Tensor:
    """Pass 2: the chunk at flat `offset` of a task vector drawn by `draw`, sparsified and rescaled."""
    if p["density"] >= 1:
        return delta
    generator = torch.Generator()
    generator.set_state(drawn.states[offset])
    kept = _random_keep(delta, sparsification, p, generator, rescale and mode == "density")
    return kept.mul_(drawn.scale) if drawn.scale is not None else kept


def _random_keep(delta, sparsification: str, p: dict, generator, divide: bool) -> torch.Tensor:
    """One chunk's random mask applied (1/p-rescaled when `divide`), as `bernoulli`/`della_magprune` do."""
    if sparsification == "random":
        kept = _bernoulli_keep(delta, p["density"], generator)
        return kept.div_(p["density"]) if divide else kept
    return della_magprune(delta, p["density"], p["epsilon"], divide, generator, "density")
