"""Ask the kernel to start reading a merge's inputs while Python is still importing torch.

Starting the interpreter and importing torch takes 1.2-1.5 s of CPU and no disk; a merge of downloaded
models then waits on the disk. `posix_fadvise(WILLNEED)` queues readahead of a whole file and returns at
once, so the reads and the import overlap. This module must not import torch (it runs before it): it reads
the config with yaml alone and only hints, never fails. Inputs larger than a quarter of the memory the
kernel calls available are left to the engine's own reads: hinting them would push out pages still needed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

MODEL_KEYS = ("model", "base_model")


def prefetch_inputs(config: str | dict) -> int:
    """Hint the kernel to read every local safetensors input of a merge config; returns the bytes hinted."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    try:
        if isinstance(config, str):
            import yaml

            config = yaml.safe_load(Path(config).read_text())
        folders = dict.fromkeys(_model_folders(config))  # a base model is often also listed among the models
        files = [f for folder in folders for f in sorted(folder.glob("*.safetensors"))]
        total = sum(f.stat().st_size for f in files)
        if not files or total > _available_bytes() // 4:
            return 0
        for file in files:
            handle = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(handle, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(handle)
        return total
    except Exception:  # a hint only: a bad config or file is the merge's to report, in its own words
        return 0


def _model_folders(node: object) -> Iterator[Path]:
    """Local folders named by `model` / `base_model` anywhere in the config (a `model+adapter` names its base)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in MODEL_KEYS and isinstance(value, str):
                folder = Path(value.split("+", 1)[0]).expanduser()
                if folder.is_dir():
                    yield folder
            else:
                yield from _model_folders(value)
    elif isinstance(node, list):
        for value in node:
            yield from _model_folders(value)


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo; 0 (so nothing is hinted) where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
