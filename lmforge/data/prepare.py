"""Training rows from data settings: the preparation SFT and distillation share.

`DataSettings` is the `data:` section of `lmforge finetune` and `lmforge distill`. `training_records` turns it
into prompt/completion (or chat) records: a user file, or a built-in task's train split. `tokenize` renders
records with the tokenizer's chat template (completion-only labels, EOS trained) into rows for the training
loop, counting truncations, dropping examples left with no trainable token, and packing when asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lmforge import config as config_io
from lmforge.data import synthetic
from lmforge.data.chat import IGNORE_INDEX, render_example
from lmforge.data.packing import pack
from lmforge.data.sources import load_records
from lmforge.errors import UserError

log = logging.getLogger("lmforge.data")


@dataclass(frozen=True)
class DataSettings:
    """Where the training examples come from and how they are tokenised."""

    path: str | None = None
    """A data file or folder (see `lmforge data inspect`)."""
    task: str | None = None
    """A built-in task whose train split to use instead of `path`."""
    format: str | None = None
    """Force the data format instead of detecting it."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical key -> your key, e.g. {prompt: question}."""
    val_fraction: float = 0.05
    """Share of records held out for validation loss."""
    max_length: int = 512
    """Longer examples are truncated (and counted)."""
    train_on_prompt: bool = False
    """Put loss on prompt tokens too."""
    packing: bool = False
    """Pack short examples into rows of max_length tokens (no cross-contamination)."""
    limit: int | None = None
    """Use only the first N records."""

    def __post_init__(self) -> None:
        """Refuse values no run can use when the config is read, before any model loads."""
        config_io.within(self, "val_fraction", 0, 1, high_open=True)
        config_io.at_least(self, "max_length", 1)
        config_io.at_least(self, "limit", 1)


def training_records(data: DataSettings) -> list[dict]:
    """The training records: a user file, or a built-in task's train split as prompt/completion."""
    if (data.path is None) == (data.task is None):
        raise UserError("give exactly one of data.path (a file) or data.task (a built-in task)")
    if data.task:
        records = [{"prompt": r["prompt"], "completion": r["answer"]} for r in synthetic.examples(data.task, "train")]
    else:
        records = load_records(data.path, fmt=data.format, columns=data.columns or None)
        if records[0]["format"] == "preference":
            raise UserError(f"{data.path} holds preference pairs: train them with DPO, not SFT")
    return records[: data.limit] if data.limit else records


def tokenize(records: list[dict], tokenizer, data: DataSettings) -> list[dict]:
    """Rendered rows for the loop; truncated examples are counted, examples left with no loss are dropped."""
    examples = [render_example(tokenizer, r, data.max_length, data.train_on_prompt) for r in records]
    truncated = sum(e.truncated for e in examples)
    if truncated:
        log.warning(
            "%d of %d examples were longer than data.max_length=%d and were truncated",
            truncated,
            len(examples),
            data.max_length,
        )
    kept = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels[1:])]
    if not kept:
        raise UserError(
            "no example has trainable tokens after masking: raise data.max_length or set data.train_on_prompt: true"
        )
    if len(kept) < len(examples):
        log.warning(
            "%d examples had no trainable tokens left after truncation and were dropped", len(examples) - len(kept)
        )
    if data.packing:
        return pack(kept, data.max_length)
    return [{"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e.input_ids)))} for e in kept]
