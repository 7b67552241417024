"""The streaming engine: worker threads read, merge in float32 and write one tensor (or row chunk) each.

Work items are output tensors, or row chunks of large tensors for elementwise methods, so peak memory is a
few tensors (never a shard, never a model). TIES-like methods, whose only whole-tensor step is a per-input
rank cut, take a huge tensor in two passes: one cut item per input (its task vector alone), then row chunks;
so do DARE/DELLA, whose draw items stream each task vector (mask and L1 sums) and whose chunks redraw it.
Each worker reads its item's inputs with positioned reads (which release the GIL, so one worker's I/O
overlaps another's arithmetic), merges them with torch single-threaded, rounds once to the output dtype
and writes at an offset fixed before the first tensor was read. A NaN/Inf in an input or in a result
stops the merge naming the tensor, unless `allow_nonfinite`. Random methods get generators keyed by
(seed, tensor name, model number): the same bits whatever the order of work or the number of workers.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.errors import UserError
from lmforge.merge import sparsify
from lmforge.merge import vocab as vocab_io
from lmforge.merge.methods import Inputs, Method, ParameterError
from lmforge.merge.plan import InputModel, TensorPlan
from lmforge.merge.safetensors_io import OutputTensor, narrow_in_place, plan_shards, read_rows, write_at

CHUNK_BYTES = 16 << 20  # float32 bytes per input per row chunk (under glibc's 32 MB cap: buffers are reused)
WHOLE_BYTES = 96 << 20  # float32 bytes per input above which a cut method runs in two passes (cuts, then chunks)
DRAW_BYTES = 1 << 20  # float32 bytes per input per read of a streamed draw (its buffers are reused, not split)
IN_FLIGHT_BYTES = 256 << 20  # input bytes of the items being merged at once (a larger item runs alone)


@dataclass(frozen=True)
class Item:
    plan: TensorPlan
    rows: tuple[int, int] | None  # a row chunk, or None for the whole tensor
    cut_of: int | None = None
    """An input number: the item computes that input's whole-tensor cut (`Method.cut`) and writes nothing."""


@dataclass
class Stats:
    tensors: int = 0
    read_bytes: int = 0
    written_bytes: int = 0
    seconds: float = 0.0


def generator_for(seed: int, tensor: str, model: int) -> torch.Generator:
    """A generator keyed by (seed, tensor name, model number), independent of order and threads."""
    digest = hashlib.sha256(f"{seed}\x00{tensor}\x00{model}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def work_items(plans: list[TensorPlan], method: Method, vocabulary: vocab_io.Vocabulary | None) -> list[Item]:
    """Whole tensors, or row chunks of about CHUNK_BYTES per input where the method is elementwise.

    A cut method's tensor over WHOLE_BYTES per input (embeddings, heads) becomes one cut item per non-base
    input, then row chunks: holding it whole for every input at once set the peak RSS of a 1B TIES merge.
    """
    items = []
    for p in plans:
        remapped = p.vocab and vocabulary is not None and not vocabulary.identity([n for n, _ in p.inputs])
        row_bytes = 4 * _numel(p.shape[1:])
        size = p.shape[0] * row_bytes if p.shape else 0
        chunkable = p.floating and not remapped and size > CHUNK_BYTES
        cut = method.cut is not None and not p.shared.get("rescale")
        drawn = method.draw is not None and len(p.shape) > 1  # DELLA's ranks are per row
        two_pass = chunkable and size > WHOLE_BYTES and (cut or drawn)
        if two_pass:
            items += [Item(p, None, cut_of=i) for i in range(len(p.inputs)) if i != p.base]
        if chunkable and (method.elementwise or two_pass):
            items += [Item(p, rows) for rows in _row_ranges(p.shape[0], row_bytes)]
        else:
            items.append(Item(p, None))
    return items


def _row_ranges(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for s in shape:
        count *= s
    return count


def run(
    plans: list[TensorPlan],
    models: list[InputModel],
    method: Method,
    out: Path,
    *,
    shard_bytes: int,
    seed: int = 0,
    allow_nonfinite: bool = False,
    vocabulary: vocab_io.Vocabulary | None = None,
    progress: bool = True,
    workers: int = 2,
) -> Stats:
    """Merge every planned tensor into safetensors shards in `out`; returns counts and timing.

    `workers` threads each read, merge and write whole items (torch single-threaded inside each): reads
    release the GIL, so one worker's I/O overlaps another's arithmetic, and no OpenMP thread spin-waits
    on a shared CPU. Items are started in order while less than IN_FLIGHT_BYTES of inputs are in flight
    (a larger item runs alone) and finished in order, so the first error stops the merge.
    """
    places = plan_shards(out, [(p.name, p.dtype, p.shape) for p in plans], shard_bytes)
    # whole-tensor cuts first, while the heap is empty: the head's, last in the plan, used to allocate its task
    # vector after merging items had grown the heap (docs/DESIGN.md, Merging)
    items = sorted(work_items(plans, method, vocabulary), key=lambda item: item.cut_of is None or bool(method.draw))
    stats, start = Stats(), time.perf_counter()
    total_bytes = sum(p.nbytes for p in places.values())
    columns = (
        TextColumn("merging"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} tensors"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )

    cuts: dict[str, dict[int, Future]] = {}  # a two-pass tensor's cut futures, by input number

    def merge_item(item: Item, cut_futures: dict[int, Future] | None) -> int:
        tensors = _read(item, models)
        if not allow_nonfinite and not all(finite(t) for t in tensors if t.is_floating_point()):
            raise UserError(_nonfinite_message(item, models))
        item_cuts = None
        if cut_futures is not None:  # submitted before this chunk, so running or done: waiting cannot deadlock
            item_cuts = [cut_futures[i].result() if i in cut_futures else None for i in range(len(tensors))]
        result = _compute(item, tensors, method, seed, vocabulary, item_cuts)
        if result.is_floating_point() and not allow_nonfinite and not finite(result):
            raise UserError(_nonfinite_message(item, models))
        return _write(places[item.plan.name], item, narrow_in_place(result, item.plan.dtype))

    with (
        _heap_reuse(),
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lmforge-merge") as pool,
        Progress(*columns, disable=not progress, transient=False) as bar,
    ):
        task = bar.add_task("merge", total=len(plans), rate="")
        running: deque[tuple[Item, Future, int]] = deque()
        in_flight, next_index = 0, 0
        try:
            while running or next_index < len(items):
                while next_index < len(items) and len(running) < 2 * workers:
                    size = _item_bytes(items[next_index], models, method)
                    if running and in_flight + size > IN_FLIGHT_BYTES:
                        break
                    item = items[next_index]
                    if item.cut_of is not None:
                        future = pool.submit(_cut, item, models, method, seed)
                        cuts.setdefault(item.plan.name, {})[item.cut_of] = future
                    else:
                        future = pool.submit(merge_item, item, cuts.get(item.plan.name))
                    running.append((item, future, size))
                    in_flight, next_index = in_flight + size, next_index + 1
                item, future, size = running.popleft()
                result = future.result()
                in_flight -= size
                if item.cut_of is not None:  # a cut: the chunks that follow read and write the tensor
                    continue
                stats.read_bytes += size
                stats.written_bytes += result
                if item.rows is None or item.rows[1] == item.plan.shape[0]:
                    cuts.pop(item.plan.name, None)
                    stats.tensors += 1
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    rate = f"{stats.tensors / elapsed:.1f} tensors/s  {stats.written_bytes / elapsed / 1e6:.0f} MB/s"
                    bar.update(task, completed=stats.tensors, rate=rate)
        except BaseException:
            for _, future, _ in running:
                future.cancel()
            raise
    stats.seconds = time.perf_counter() - start
    assert stats.written_bytes == total_bytes, (stats.written_bytes, total_bytes)
    return stats


@contextmanager
def _heap_reuse():
    """Have glibc keep every freed block in one heap for reuse while merging (Linux only).

    By default freed buffers over the mmap threshold (and all of worker threads' arenas, trimmed eagerly)
    went back to the kernel and were faulted in again page by page for the next item: 2.4M minor faults
    and ~4 s of system time in a 1B merge, 300k-730k in a 135M one. While merging, no block is mapped, the
    heap is not trimmed, and the workers share one arena, so one item's freed memory serves the next and
    one worker's the other. The heap then holds no more than the merge's peak, provided nothing small is
    allocated and kept between large temporaries (it would split their freed space): loops that keep
    results preallocate their buffers (`sparsify.draw`, `sparsify._kth`). glibc's limits are restored
    after but the mmap threshold, which stays at 32 MB (glibc cannot go back to its dynamic threshold).
    """
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc accepts (measured: less peak RSS)
            libc.mallopt(_M_ARENA_MAX, 1)  # set before the worker threads start
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
            libc.mallopt(_M_MMAP_MAX, 0)
        except (OSError, AttributeError):  # not glibc (musl): keep its defaults
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's default
            libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)  # glibc's default, then give the kept memory back
            libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -3, -4, -8  # from glibc's malloc.h


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: min and max propagate both, in one pass with no temporary the size of the tensor."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _item_bytes(item: Item, models: list[InputModel], method: Method) -> int:
    if item.cut_of is not None and method.draw is not None:  # streamed: a few rows of the input and the base
        return 2 * DRAW_BYTES
    if item.cut_of is not None:  # its whole task vector; over the limit, so it runs alone (two at once set the peak)
        return IN_FLIGHT_BYTES + _numel(item.plan.shape) * _compute_dtype(item.plan, models).itemsize
    total = 0
    for number, name in item.plan.inputs:
        info = models[number].index[name]
        total += (info.end - info.start) if item.rows is None else (item.rows[1] - item.rows[0]) * info.row_bytes
    return total


def _read(item: Item, models: list[InputModel]) -> list[torch.Tensor]:
    """Read an item's inputs and convert them to the compute precision."""
    tensors = []
    for number, name in item.plan.inputs:
        info = models[number].index[name]
        dtype = (torch.float64 if info.dtype == torch.float64 else torch.float32) if item.plan.floating else None
        tensors.append(read_rows(info, item.rows, dtype))
    return tensors


def _compute_dtype(plan: TensorPlan, models: list[InputModel]) -> torch.dtype:
    """float32, or float64 where any input is float64 (mixed precisions are computed in float64)."""
    dtypes = {models[number].index[name].dtype for number, name in plan.inputs}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _cut(item: Item, models: list[InputModel], method: Method, seed: int) -> sparsify.Cut | sparsify.Draw | None:
    """One input's cut or random draw on its whole task vector, built row chunk by row chunk. A draw streams
    the chunks (its mask and L1 sums are per element); a cut holds the task vector whole, the only tensor
    of the item held whole, one input at a time (the chunks that follow apply the cut)."""
    plan, dtype = item.plan, _compute_dtype(item.plan, models)
    (base_number, base_name), (number, name) = plan.inputs[plan.base], plan.inputs[item.cut_of]
    row_numel = _numel(plan.shape[1:])
    ranges = _row_ranges(plan.shape[0], 4 * row_numel)  # the row chunk items' ranges: a draw's offsets match

    def rows(a: int, b: int, number: int, name: str) -> torch.Tensor:
        return read_rows(models[number].index[name], (a, b), dtype)

    if method.draw is not None:  # streamed, ~1 MB at a time: (flat offset, task vector rows), in order
        step = max(1, DRAW_BYTES // (4 * row_numel))
        reads = [(c, min(c + step, b)) for a, b in ranges for c in range(a, b, step)]  # each chunk starts a read
        chunks = ((a * row_numel, rows(a, b, number, name).sub_(rows(a, b, base_number, base_name))) for a, b in reads)
        generator = generator_for(seed, plan.name, number)
        starts = {a * row_numel for a, _ in ranges}
        return method.draw(chunks, starts, plan.shape[0], plan.per_input[item.cut_of], plan.shared, generator)
    delta = torch.empty(plan.shape, dtype=dtype)
    for a, b in ranges:
        torch.sub(rows(a, b, number, name), rows(a, b, base_number, base_name), out=delta[a:b])
    return method.cut(delta, plan.per_input[item.cut_of])


def _compute(item: Item, tensors, method: Method, seed: int, vocabulary, cuts=None) -> torch.Tensor:
    plan = item.plan
    if not plan.floating:
        if any(t.dtype != tensors[0].dtype or not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise UserError(f"non-float tensor {plan.name} differs between the inputs: merge models that agree on it")
        return tensors[0]
    numbers = [n for n, _ in plan.inputs]
    if plan.vocab and vocabulary is not None:
        if vocabulary.identity(numbers):
            tensors = [t[: vocabulary.size] for t in tensors]
        else:
            tensors = vocab_io.align(tensors, numbers, vocabulary, plan.base)
    if len({t.dtype for t in tensors}) > 1:
        tensors = [t.to(torch.float64) for t in tensors]
    inputs = Inputs(
        tensors,
        plan.base if method.base != "ignored" else None,
        plan.shared,
        plan.per_input,
        lambda i: generator_for(seed, plan.name, numbers[i]),
        cuts,
        0 if item.rows is None else item.rows[0] * _numel(plan.shape[1:]),
    )
    try:
        return method.fn(inputs)
    except ParameterError as err:
        raise UserError(f"{plan.name}: {err}") from None


def _write(place: OutputTensor, item: Item, tensor: torch.Tensor) -> int:
    offset = 0 if item.rows is None else item.rows[0] * (place.nbytes // item.plan.shape[0])
    return write_at(place, tensor, offset)


def _nonfinite_message(item: Item, models: list[InputModel]) -> str:
    """Name the input holding NaN/Inf if there is one; else the merge itself made it (e.g. weights summing to 0)."""
    for number, name in item.plan.inputs:
        raw = read_rows(models[number].index[name], item.rows)
        if raw.is_floating_point() and not torch.isfinite(raw).all():
            return (
                f"NaN/Inf in input tensor {name} of {models[number].ref}: fix that model, "
                "or pass --allow-nonfinite to write the result anyway"
            )
    return (
        f"the merge produced NaN/Inf in {item.plan.name} (parameters {item.plan.shared} {item.plan.per_input}): "
        "check the parameters (e.g. weights summing to 0), or pass --allow-nonfinite to write it anyway"
    )
