"""Output folders: they appear whole or not at all, and every run's folder explains itself the same way.

Every command writes into a hidden staging folder beside the target and renames it into place at the
end, so an interrupted or failed run leaves no half output. An existing target is refused unless the
caller allows overwriting. A model-making run (finetune, dpo, distill, merge) fills its staging folder
through `save_model` (weights and tokenizer) and `write_run_files` (lmforge.yaml, log.jsonl, run.json and
the README model card that `model_card` renders from a title, a sentence and tables).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.report.record import write_json

RECIPE_NOTE = "The full recipe is in lmforge.yaml; costs and scores in run.json."


@contextmanager
def staged_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes `target`, on any error it is removed.

    Under several processes (a training command run by `accelerate launch` or torchrun) only rank 0 stages and
    renames: the other ranks get a scratch folder outside the output's, deleted on exit, and every rank waits
    at the end until rank 0 has renamed (so no rank removes the work folder while another still reads it).
    """
    target = Path(target)
    if _rank_in_group() > 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"lmforge-rank{_rank_in_group()}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _wait_for_rank0()
        return
    if target.exists() and not overwrite:
        raise UserError(f"output folder {target} exists: pass --overwrite or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    _wait_for_rank0()


def _group():
    """torch.distributed when a process group of several ranks is running (without importing torch)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed if distributed.get_world_size() > 1 else None
    return None


def _rank_in_group() -> int:
    group = _group()
    return group.get_rank() if group is not None else 0


def _wait_for_rank0() -> None:
    group = _group()
    if group is not None:
        group.barrier()


@dataclass(frozen=True)
class CardTable:
    """A markdown table of a model card: column names and rows of already formatted cells."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    """A line above the table."""


def model_card(
    title: str, sentence: str, sections: Sequence[CardTable | Sequence[str]], note: str = RECIPE_NOTE
) -> str:
    """The README.md of an output folder: `# title`, a sentence saying how it was made, then each section
    (a table, or markdown lines) after one blank line, and a closing note."""
    lines = [f"# {title}", "", sentence]
    for section in sections:
        lines.append("")
        if isinstance(section, CardTable):
            lines += [section.caption, ""] if section.caption else []
            lines.append("| " + " | ".join(section.columns) + " |")
            lines.append("|" + "---|" * len(section.columns))
            lines += ["| " + " | ".join(row) + " |" for row in section.rows]
        else:  # markdown lines; the blank line before a section is written here, once
            lines += list(itertools.dropwhile(lambda line: not line, section))
    return "\n".join([*lines, "", note]) + "\n"


def save_model(staging: Path, model, tokenizer) -> None:
    """Weights and config (`save_pretrained`: safetensors, or a PEFT adapter) and the tokenizer."""
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def write_run_files(staging: Path, config: Any, record: dict, card: str, log_file: Path | None = None) -> None:
    """What makes a model folder explain itself: the resolved config as lmforge.yaml (a config dataclass, or
    plain data such as a mergekit config), the training log, run.json and the model card."""
    data = config_io.to_dict(config) if dataclasses.is_dataclass(config) else config
    (staging / "lmforge.yaml").write_text(config_io.to_yaml(data), encoding="utf-8")
    if log_file is not None:
        shutil.copy(log_file, staging / "log.jsonl")
    write_json(staging / "run.json", record)
    (staging / "README.md").write_text(card, encoding="utf-8")
