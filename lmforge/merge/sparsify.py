"""Sparsification of task vectors: magnitude (TIES), outlier-trimmed magnitude (breadcrumbs), random (DARE),
magnitude-ranked random (DELLA).

Same semantics as mergekit's `sparsify.py` (density, gamma, epsilon, and its "rescale" that matches the L1
norm of the kept values to the original's), with two differences. Rank cut-offs come from sample-select
k-th values (O(n)) instead of a full argsort, and are kept as a `Cut` of a few numbers: entries tied exactly
at a cut-off are taken in index order, so exactly k are kept (which tied entries mergekit keeps is
unspecified: the only place results can differ), and a cut taken on a whole tensor applies to its row
chunks. Random masks draw from a `torch.Generator` the caller keys by (seed, tensor, model), piece by
piece in order (the same bits as one draw), so a merge gives the same bits whatever the order or thread
count. `rescale_mode="density"` gives the papers' 1/p rescaling instead of the L1 match
(DARE, Yu et al. 2023, https://arxiv.org/abs/2311.03099; DELLA, Deep et al. 2024,
https://arxiv.org/abs/2406.11617).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

L1_EPS = 1e-7  # mergekit's tolerance below which a norm is not rescaled


CHUNK = 1 << 22  # elements per pass-through piece: the keys (e.g. |delta|) never exist for a whole tensor


def _pieces(flat: torch.Tensor) -> list[torch.Tensor]:
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def kth_smallest(values: torch.Tensor, k: int, key=_identity) -> torch.Tensor:
    """The exact k-th smallest (1-based) of key(values) for a flat tensor, by sample-select, not sorting."""
    return _kth(values, k, key)[0]


def _kth(values: torch.Tensor, k: int, key=_identity) -> tuple[torch.Tensor, int, int]:
    """(k-th smallest of key(values), how many keys are below it, how many equal it), for a flat tensor.

    A fixed random sample brackets the k-th value with a margin of 4 standard deviations of the sample rank
    (a 1-sigma margin missed a third of the time, and a miss costs a whole-tensor `kthvalue`); one counting
    pass (piece by piece, so key(values) is never whole) checks the bracket, and the few values inside it go
    to `torch.kthvalue`. The counts come from the same pass, so the cut below needs no pass of its own.
    """
    n = values.numel()
    if n <= 1 << 18:
        return _whole_kth(values, k, key)
    size = 1 << 14
    picks = torch.randint(n, (size,), generator=torch.Generator().manual_seed(n))
    sample = key(values[picks]).sort().values
    share = (k - 1) / n
    middle, margin = share * size, int(4 * (size * share * (1 - share)) ** 0.5) + 16
    low = sample[max(0, int(middle) - margin)]
    high = sample[min(size - 1, int(middle) + margin)]
    below, inside = 0, []
    for piece in _pieces(values):
        keys = key(piece)
        under = keys < low
        below += int(torch.count_nonzero(under))
        inside.append(keys[under.logical_or_(keys > high).logical_not_()])
    inside = torch.cat(inside)
    if not below < k <= below + inside.numel():  # the sample missed (or NaN keys): select on the whole tensor
        return _whole_kth(values, k, key)
    value = torch.kthvalue(inside, k - below).values
    return value, below + int(torch.count_nonzero(inside < value)), int(torch.count_nonzero(inside == value))


def _whole_kth(values: torch.Tensor, k: int, key) -> tuple[torch.Tensor, int, int]:
    keys = key(values)
    value = torch.kthvalue(keys, k).values
    return value, int(torch.count_nonzero(keys < value)), int(torch.count_nonzero(keys == value))


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
    low, below, equal = _kth(flat, start + 1, key)
    low_ties = _tie_interval(flat, low, start - below, stop - below, equal, key)
    high, high_ties = None, (0, 0)
    if stop < n:
        high, below, equal = _kth(flat, stop, key)
        # a range all tied at one value keeps key <= high, and the low boundary's interval picks the ties
        high_ties = (0, n) if bool(high == low) else _tie_interval(flat, high, 0, stop - below, equal, key)
    return Cut(low, low_ties, high, high_ties, key)


def _tie_interval(flat, value, first: int, stop: int, equal: int, key) -> tuple[int, int]:
    """The flat-index interval of the tied entries (key == value) of tie ranks [first, stop), in index order."""
    first, stop = max(0, first), min(equal, stop)
    if first >= stop:
        return (0, 0)
    if first == 0 and stop == equal:
        return (0, flat.numel())  # every tied entry is kept: no index pass
    wanted, found, seen = [first, stop - 1], [], 0
    for offset, piece in zip(range(0, flat.numel(), CHUNK), _pieces(flat), strict=True):
        tied = key(piece) == value
        count = int(torch.count_nonzero(tied))
        while wanted and wanted[0] < seen + count:
            found.append(offset + int(tied.nonzero()[wanted.pop(0) - seen]))
        seen += count
    return (found[0], found[1] + 1)


def apply(cut: Cut, values: torch.Tensor, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean keep-mask of `cut` on `values`, flat elements [offset, offset + numel) of the cut tensor."""
    keys = cut.key(values.reshape(-1))
    n = keys.numel()
    # a chunk inside a boundary's tie interval keeps all its ties there: one comparison, no fix-up
    low_all = cut.low_ties[0] <= offset and offset + n <= cut.low_ties[1]
    high_all = cut.high_ties[0] <= offset and offset + n <= cut.high_ties[1]
    mask = torch.ge(keys, cut.low, out=out) if low_all else torch.gt(keys, cut.low, out=out)
    if cut.high is not None:
        mask.logical_and_(keys <= cut.high if high_all else keys < cut.high)
    boundaries = [] if low_all else [(cut.low, cut.low_ties)]
    boundaries += [] if cut.high is None or high_all else [(cut.high, cut.high_ties)]
    for value, (first, end) in boundaries:
        a, b = max(first - offset, 0), min(end - offset, n)
        if a < b:
            mask[a:b].logical_or_(keys[a:b] == value)
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
    """delta *= the cut's mask, in place, piece by piece (`offset`: delta's first flat index in the cut tensor).

    Multiplying by a whole bool mask makes a float copy of it, and masked_fill is 4x slower; the product
    keeps mergekit's NaN * 0 = NaN. The mask exists one piece at a time, never for the whole tensor.
    """
    if cut is None:
        return delta
    flat = delta.view(-1)
    scratch = torch.empty(min(CHUNK, flat.numel()), dtype=torch.bool)
    for start, piece in zip(range(0, flat.numel(), CHUNK), _pieces(flat), strict=True):
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
    # drawn piece by piece: the same bits as one whole draw (one number per element, in order), without a
    # float32 tensor of noise the size of the delta
    for piece in _pieces(delta.view(-1)):
        piece.mul_(torch.rand(piece.numel(), generator=generator, dtype=torch.float32) < density)
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
