"""Safetensors without mmap: a header index of a model folder, reads at offsets, and a pre-planned writer.

Reading: every shard's JSON header is parsed once into `TensorInfo(file, dtype, shape, start, end)`; a
tensor (or a range of its rows, one contiguous byte range) is read with an unbuffered `readinto` at its
offset, straight into a fresh tensor. This is a deliberate departure from `safe_open`'s memory map: pages
touched through a map count in the process's resident memory, so streaming models through maps shows
their whole size as RSS, while reads leave the bytes in the page cache only. The read releases the GIL,
so one worker's I/O overlaps another's compute. Writing: the whole output (names, dtypes, shapes, shard
split) is known before any tensor is computed, so each shard's header is written first, its data region
is reserved with `posix_fallocate` (a full disk fails before the merge starts, not at 90%), and tensors
land at their offsets. Format: https://github.com/huggingface/safetensors#format
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.models.load import check_safetensors

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: file, dtype, shape and its byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    """Absolute offset of the first byte (header included)."""
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // self.shape[0] if self.shape and self.shape[0] else 0


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Index one safetensors file; corrupt or truncated files are a UserError naming the file."""
    check_safetensors(file)  # header length, JSON, and file long enough for its data
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    index = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"corrupt safetensors file {file}: bad header entry for {name}: re-save it") from None
        info = TensorInfo(file, dtype, shape, 8 + length + begin, 8 + length + end)
        if end - begin != info.numel * dtype.itemsize:
            raise UserError(f"corrupt safetensors file {file}: {name} has {end - begin} bytes for shape {list(shape)}")
        index[name] = info
    return index


def index_folder(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder (one file or shards), by name."""
    index: dict[str, TensorInfo] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights: save it with save_pretrained(safe_serialization=True)")
    for file in files:
        index.update(read_header(file))
    return index


def read_rows(info: TensorInfo, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read a tensor, or rows [a, b) of it, with positioned reads (no memory map), converted to `dtype`.

    A widening conversion (bfloat16 -> float32) happens in the one buffer of the result: the stored bytes
    are read into its upper part and widened block by block from the front, each block through a small
    copy, so no write reaches bytes not yet read. This saves a buffer the size of the stored tensor, and
    the page faults of filling it (a third of the faults of a 1B bfloat16 merge).
    """
    start, end, shape = info.start, info.end, info.shape
    if rows is not None:
        start, end = info.start + rows[0] * info.row_bytes, info.start + rows[1] * info.row_bytes
        shape = (rows[1] - rows[0], *info.shape[1:])
    widen = dtype is not None and dtype.itemsize > info.dtype.itemsize
    size = (end - start) // info.dtype.itemsize
    buffer = torch.empty(size * dtype.itemsize if widen else end - start, dtype=torch.uint8)
    stored = buffer[buffer.numel() - (end - start) :]
    view, done = memoryview(stored.numpy()), 0
    with open(info.file, "rb", buffering=0) as handle:  # unbuffered: readinto is one read(2) into our buffer
        handle.seek(start)
        while done < end - start:
            got = handle.readinto(view[done:])
            if not got:
                raise UserError(f"truncated safetensors file {info.file}: re-save or re-download it")
            done += got
    if not widen:
        tensor = buffer.view(info.dtype).reshape(shape)
        return tensor if dtype is None else tensor.to(dtype)
    out = buffer.view(dtype)
    _convert_in_blocks(stored.view(info.dtype), out)  # writes end at byte 4b <= 2n + 2b: the next unread block
    return out.reshape(shape)


def narrow_in_place(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` for a narrower dtype, written into the front of tensor's own buffer (which it
    overwrites), block by block: no second buffer the size of an output tensor, and none of its faults."""
    if dtype.itemsize >= tensor.dtype.itemsize or not tensor.is_contiguous() or tensor.storage_offset():
        return tensor.to(dtype)
    flat = tensor.view(-1)
    out = flat.view(torch.uint8)[: flat.numel() * dtype.itemsize].view(dtype)
    _convert_in_blocks(flat, out)  # block a's bytes are read before any write reaches them
    return out.view(tensor.shape)


def _convert_in_blocks(source: torch.Tensor, out: torch.Tensor) -> None:
    """out[:] = source converted to out's dtype, BLOCK elements at a time through a small buffer, front to back:
    `source` and `out` may share memory, provided no block's write reaches source bytes not yet read."""
    size = source.numel()
    block = torch.empty(min(BLOCK, size), dtype=source.dtype)
    for a in range(0, size, BLOCK):
        b = min(a + BLOCK, size)
        out[a:b].copy_(block[: b - a].copy_(source[a:b]))


BLOCK = 1 << 17  # elements converted at once, through a small buffer that stays in the cache


@dataclass(frozen=True)
class OutputTensor:
    """A planned output tensor's place: which shard file and the absolute offset of its data."""

    file: Path
    offset: int
    nbytes: int


def plan_shards(
    folder: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> dict[str, OutputTensor]:
    """Split tensors (in order) into shards, write each shard's header and reserve its data region.

    Returns where each tensor goes; also writes model.safetensors.index.json when there are several shards.
    """
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
    size = 0
    for name, dtype, shape in tensors:
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape, nbytes))
        size += nbytes
    count = len(shards)
    places: dict[str, OutputTensor] = {}
    for number, shard in enumerate(shards, 1):
        file = folder / ("model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors")
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape, nbytes in shard:
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
        base = 8 + len(text)
        with open(file, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            _reserve(handle.fileno(), base + offset, file)
        for name, _dtype, _shape, nbytes in shard:
            begin = header[name]["data_offsets"][0]
            places[name] = OutputTensor(file, base + begin, nbytes)
    if count > 1:
        total = sum(p.nbytes for p in places.values())
        index = {"metadata": {"total_size": total}, "weight_map": {n: p.file.name for n, p in places.items()}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return places


def _reserve(fd: int, size: int, file: Path) -> None:
    """Allocate the file's full size now, so a full disk is reported before any work is done."""
    try:
        if not hasattr(os, "posix_fallocate"):  # macOS, Windows
            raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(
                f"disk full: {file} needs {size / 1e6:.1f} MB: free space or choose another folder"
            ) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)  # file systems without fallocate: sparse file, errors surface on write


def write_at(place: OutputTensor, tensor: torch.Tensor, row_offset_bytes: int = 0) -> int:
    """Write a contiguous tensor's bytes at its planned offset (plus an offset for row chunks)."""
    data = memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
    with open(place.file, "r+b", buffering=0) as handle:
        handle.seek(place.offset + row_offset_bytes)
        done = 0
        while done < len(data):
            try:
                done += handle.write(data[done:])
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    raise UserError(f"disk full writing {place.file}: free space or choose another folder") from None
                raise
    return len(data)
