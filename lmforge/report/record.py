"""The run record: one JSON schema that every command writes as `run.json`, so any runs compare.

Schema (DESIGN.md): {command, method, inputs, data, config, versions, hardware, started, wall_s, cpu_s,
peak_rss_bytes, peak_gpu_bytes, tokens_seen, params_total, params_trainable, size_bytes, metrics}, where
metrics is {task: {metric: {"value": v, "stderr": s}}}. Costs are measured by `RunMeter`, never
estimated; peak RSS is the process's high-water mark (one command per process gives a per-run figure).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
RECORD_KEYS = (
    "schema",
    "command",
    "method",
    "inputs",
    "data",
    "config",
    "versions",
    "hardware",
    "started",
    "wall_s",
    "cpu_s",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "tokens_seen",
    "params_total",
    "params_trainable",
    "size_bytes",
    "metrics",
)


def peak_rss_bytes() -> int:
    """High-water resident memory of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def versions() -> dict[str, str]:
    """Versions of the libraries that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("lmforge", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def hardware() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
    }


@dataclass
class RunMeter:
    """Measures what a run costs: wall time, CPU time (children included) and peak memory."""

    started: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    _wall: float = field(default_factory=time.perf_counter)
    _cpu: float = field(default_factory=lambda: _cpu_seconds())

    def costs(self) -> dict:
        import torch

        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        return {
            "started": self.started,
            "wall_s": round(time.perf_counter() - self._wall, 3),
            "cpu_s": round(_cpu_seconds() - self._cpu, 3),
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_gpu_bytes": gpu,
        }


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def run_record(command: str, method: str, meter: RunMeter, **fields) -> dict:
    """Assemble a complete record; fields not given are null, unknown fields are a programming error."""
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown:
        raise TypeError(f"unknown run record fields: {sorted(unknown)}")
    record = dict.fromkeys(RECORD_KEYS)
    record.update(schema=SCHEMA_VERSION, command=command, method=method, versions=versions(), hardware=hardware())
    record.update(meter.costs())
    record.update(fields)
    train = fields["config"].get("train") if isinstance(fields.get("config"), dict) else None
    if isinstance(train, dict):  # a training run: the engine and precision it resolved, not the config's "auto"
        from lmforge.train.engines import engine_summary

        record["engine"] = engine_summary(train)
    record["argv"] = sys.argv
    return record


def write_json(path: Path, obj: object) -> None:
    """Write JSON through a temporary file and rename, so a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    temporary.replace(path)


def read_run(folder: str | Path) -> dict:
    """Read a run folder's run.json."""
    return json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))
