"""The output and work folders of a training command: start, refuse, resume (finetune, dpo, distill).

A training run writes its checkpoints into `<output>.work/` and its result into `<output>/` at the end.
`start_run` runs before any model loads and decides from the folders and the config alone: a new run
refuses an existing output (unless overwrite) and drops a stale work folder; a resume refuses a finished
output (no work folder left) and a work folder whose checkpoint was made with another config.
`save_run_config` stores the resolved config in the work folder (`lmforge.yaml`) as training starts: it is
what the next resume is checked against. Under several processes every rank runs these checks, and only
rank 0 removes or writes anything (train/ranks.py). `on_interrupt` turns Ctrl-C during training into the command
that resumes.

On resume every key of the resolved config must match the work folder's, except RESUME_MAY_CHANGE: the
switches (resume, overwrite), what happens after training (eval: the forgetting report; merge: the
adapter merged into the weights or not), and settings that change memory or logging but not one update
(checkpoint interval, TensorBoard, allocator, micro-batch token budget, activation checkpointing, the
distillation loss's chunk size). Everything else shapes the run (model, data, method, LoRA shapes,
optimiser, schedule, seed) and is refused, naming the first key that differs.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.train.engines import check_run
from lmforge.train.ranks import check_launch, is_main

log = logging.getLogger("lmforge")
CONFIG_FILE = "lmforge.yaml"
RESUME_MAY_CHANGE = (
    "resume",
    "overwrite",
    "eval",
    "merge",
    "train.save_every",
    "train.tensorboard",
    "train.release_memory",
    "train.micro_batch_tokens",
    "train.gradient_checkpointing",
    "chunk_size",
)
_VERBS_WITH_RESUME = ("finetune", "dpo", "distill")


def work_folder(output: str | Path) -> Path:
    """Where a run keeps its checkpoints until it finishes: `<output>.work` beside the output."""
    return Path(f"{output}.work")


def start_run(cfg: Any) -> tuple[Path, Path]:
    """Refuse, before anything loads, a run that cannot start or resume; return (output, work) folders.

    `cfg` is a training command's config (output, overwrite, resume; its values were range-checked when it
    was read). A run that does not resume starts from nothing: a work folder left by an interrupted run is
    removed.
    """
    check_launch()
    check_run(cfg)  # the launched engine, train.mixed_precision and lora.quantize can run here
    output, work = Path(cfg.output), work_folder(cfg.output)
    if cfg.resume and work.is_dir():
        check_resumable(cfg, work)
    elif cfg.resume and output.exists() and not cfg.overwrite:
        raise UserError(f"{output} is a finished run; pass --overwrite to train it again")
    elif output.exists() and not (cfg.overwrite or cfg.resume):
        raise UserError(f"output folder {output} exists: set overwrite: true (or --overwrite), or resume: true")
    if not cfg.resume and is_main():
        shutil.rmtree(work, ignore_errors=True)
    return output, work


def check_resumable(cfg: Any, work: Path) -> None:
    """Refuse to resume `work` with a config that differs from the one its training started with."""
    stored = work / CONFIG_FILE
    if not stored.is_file() and not (work / "checkpoint").exists():
        return  # training never started: what is there (distillation's caches) is keyed by its inputs
    if not stored.is_file():
        raise UserError(
            f"--resume: {work} holds no {CONFIG_FILE}, so it cannot be checked against this run: "
            "start over without --resume"
        )
    before, now = _flat(config_io.read_yaml(stored)), _flat(config_io.to_dict(cfg))
    for key in list(dict.fromkeys([*before, *now])):
        if _may_change(key) or before.get(key, _UNSET) == now.get(key, _UNSET):
            continue
        old, new = _show(before.get(key, _UNSET)), _show(now.get(key, _UNSET))
        raise UserError(
            f"--resume: {work} was started with {key}={old}, this run has {new}: "
            f"resume with {key}={old}, or start over without --resume"
        )


def save_run_config(cfg: Any, work: Path) -> None:
    """As training starts, store the resolved config the next resume is checked against (a resumed run keeps
    the stored one: the keys it may change are not the run's identity)."""
    work.mkdir(parents=True, exist_ok=True)
    if is_main() and not (work / CONFIG_FILE).is_file():
        config_io.dump(cfg, work / CONFIG_FILE)


@contextmanager
def on_interrupt(work: Path) -> Iterator[None]:
    """Around training: on Ctrl-C, say which command resumes from the checkpoint the loop saved in `work`."""
    try:
        yield
    except KeyboardInterrupt:
        log.warning("to resume: %s", resume_command(work))
        raise


def resume_command(work: Path, argv: list[str] | None = None) -> str:
    """The user's own command line with --resume added, or, from Python, the key to set."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) > 1 and Path(argv[0]).name == "lmforge" and argv[1] in _VERBS_WITH_RESUME:
        args = argv[1:] if "--resume" in argv else [*argv[1:], "--resume"]
        return shlex.join(["lmforge", *args])
    return f"run the same config again with resume: true (it continues from {work / 'checkpoint'})"


_UNSET = object()


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys; lists and other values are compared whole."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat |= _flat(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)
