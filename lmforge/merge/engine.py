"""The streaming engine: worker threads read, merge in float32 and write one tensor (or row chunk) each.

Work items are output tensors, or row chunks of large tensors for elementwise methods, so peak memory is a
few tensors (never a shard, never a model). Each worker reads its item's inputs with positioned reads
(which release the GIL, so one worker's I/O overlaps another's arithmetic), merges them with torch
single-threaded, rounds once to the output dtype and writes at an offset fixed before the first tensor
was read. A NaN/Inf in an input or in a result stops the merge naming the tensor, unless
`allow_nonfinite`. Random methods get generators keyed by (seed, tensor name, model number): the same
bits whatever the order of work or the number of workers.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.errors import UserError
from lmforge.merge import vocab as vocab_io
from lmforge.merge.methods import Inputs, Method, ParameterError
from lmforge.merge.plan import InputModel, TensorPlan
from lmforge.merge.safetensors_io import OutputTensor, plan_shards, read_rows, write_at

CHUNK_BYTES = 64 << 20  # float32 bytes per input per row chunk of an elementwise method
IN_FLIGHT_BYTES = 256 << 20  # input bytes of the items being merged at once (a larger item runs alone)


@dataclass(frozen=True)
class Item:
    plan: TensorPlan
    rows: tuple[int, int] | None  # a row chunk, or None for the whole tensor


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
    """Whole tensors, or row chunks of about CHUNK_BYTES per input where the method is elementwise."""
    items = []
    for p in plans:
        remapped = p.vocab and vocabulary is not None and not vocabulary.identity([n for n, _ in p.inputs])
        row_bytes = 4 * _numel(p.shape[1:])
        if method.elementwise and p.floating and not remapped and p.shape and p.shape[0] * row_bytes > CHUNK_BYTES:
            step = max(1, CHUNK_BYTES // max(row_bytes, 1))
            items += [Item(p, (a, min(a + step, p.shape[0]))) for a in range(0, p.shape[0], step)]
        else:
            items.append(Item(p, None))
    return items


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
    items = work_items(plans, method, vocabulary)
    stats, start = Stats(), time.perf_counter()
    total_bytes = sum(p.nbytes for p in places.values())
    columns = (
        TextColumn("merging"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} tensors"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )

    def merge_item(item: Item) -> int:
        tensors = _read(item, models)
        if not allow_nonfinite and not all(finite(t) for t in tensors if t.is_floating_point()):
            raise UserError(_nonfinite_message(item, models))
        result = _compute(item, tensors, method, seed, vocabulary)
        if result.is_floating_point() and not allow_nonfinite and not finite(result):
            raise UserError(_nonfinite_message(item, models))
        return _write(places[item.plan.name], item, result.to(item.plan.dtype))

    with (
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lmforge-merge") as pool,
        Progress(*columns, disable=not progress, transient=False) as bar,
    ):
        task = bar.add_task("merge", total=len(plans), rate="")
        running: deque[tuple[Item, Future, int]] = deque()
        in_flight, next_index = 0, 0
        try:
            while running or next_index < len(items):
                while next_index < len(items) and len(running) < 2 * workers:
                    size = _item_bytes(items[next_index], models)
                    if running and in_flight + size > IN_FLIGHT_BYTES:
                        break
                    running.append((items[next_index], pool.submit(merge_item, items[next_index]), size))
                    in_flight, next_index = in_flight + size, next_index + 1
                item, future, size = running.popleft()
                stats.written_bytes += future.result()
                stats.read_bytes += size
                in_flight -= size
                if item.rows is None or item.rows[1] == item.plan.shape[0]:
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


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf: min and max propagate both, in one pass with no temporary the size of the tensor."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _item_bytes(item: Item, models: list[InputModel]) -> int:
    total = 0
    for number, name in item.plan.inputs:
        info = models[number].index[name]
        total += (info.end - info.start) if item.rows is None else (item.rows[1] - item.rows[0]) * info.row_bytes
    return total


def _read(item: Item, models: list[InputModel]) -> list[torch.Tensor]:
    """Read an item's inputs and convert them to the compute precision."""
    tensors = []
    for number, name in item.plan.inputs:
        raw = read_rows(models[number].index[name], item.rows)
        if item.plan.floating:
            raw = raw.to(torch.float64 if raw.dtype == torch.float64 else torch.float32)
        tensors.append(raw)
    return tensors


def _compute(item: Item, tensors, method: Method, seed: int, vocabulary) -> torch.Tensor:
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
