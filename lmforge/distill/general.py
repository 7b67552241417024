"""General text beside the task: what keeps a distilled student's general ability (issue 17, item 2).

A student trained on task prompts alone keeps the task and loses general text (the demo's probe perplexity
went from 14 to 12,430). Every recipe that keeps it trains on general text too: MiniLLM (Gu et al. 2024,
arXiv:2306.08543) adds one pre-training batch per task batch at loss weight 1; Minitron (Muralidharan et al.
2024, arXiv:2407.14679) distils on its pre-training mix with forward KL on logits only.

Here every optimiser step holds task rows and general rows at `ratio`. The loop trains on *units*: a unit
is T task rows and G general rows (G / T = ratio), so every micro-batch, and every step, holds them at the
ratio exactly; `train.batch_size` counts units (one task row each when the ratio is a whole number). The
general rows have their own objectives and weight: the step's loss is the task loss per task token plus
`weight` times the general loss per general token, both over the whole mix (a constant token ratio, so the
loss stays a sum over tokens and N processes equal one).

General text comes from a user file (.jsonl with a `text` key, or .txt split at blank lines), or by default
from the teacher itself: samples at temperature 1 continuing a built-in list of varied openings, written
once per teacher and settings into $LMFORGE_CACHE/general_samples (a resumed run, and every other student of
the same teacher, reads them back). Never from the perplexity probe: any text
sharing an 8-word sequence with a probe passage is dropped. `correct_teacher` first fine-tunes the teacher
lightly on the general text (LoRA, merged), as Minitron's follow-up does when the teacher's original data is
not available (Sreenivas et al. 2024, arXiv:2408.11796); on the teacher's own samples that changes little,
on a user's file it adapts the teacher to that text.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import torch

from lmforge import config as config_io
from lmforge.data.packing import collate as pad_rows
from lmforge.data.probe import general_text
from lmforge.data.sources import load_records
from lmforge.distill import signals
from lmforge.distill.objectives import Objective, check_objectives
from lmforge.errors import UserError
from lmforge.finetune.lora import LoraSettings, attach_lora, merge_and_verify
from lmforge.train import ranks
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.loop import TrainConfig, train

log = logging.getLogger("lmforge.distill")

# Openings the teacher continues at temperature 1: varied genres and registers, none about Python's
# reference manual (the probe's text).
PROMPTS = (
    "The history of the printing press begins",
    "Once upon a time, in a village at the edge of a great forest,",
    "To make a simple tomato soup, you will need",
    "Dear Sam,\n\nThank you for your letter. Since we last spoke,",
    "The mitochondria is often called the powerhouse of the cell because",
    "Breaking news: heavy rain has flooded",
    "Q: What causes the seasons on Earth?\nA:",
    "In economics, inflation is",
    "The best way to learn a new language is",
    "Chapter 1\n\nThe train was late again, and Maria",
    "Photosynthesis is the process by which",
    "Here are five tips for a good night's sleep:\n1.",
    "The French Revolution of 1789",
    "Mount Everest, the highest mountain on Earth,",
    "A healthy diet includes",
    "The football match last Saturday ended",
    "Volcanoes form when",
    "My grandmother's kitchen always smelled of",
    "The Roman Empire was",
    "Climate change refers to",
    "How to change a flat tyre: first,",
    "The human heart has four chambers:",
    "In 1969, Apollo 11",
    "Jazz music originated in",
    "The committee met on Tuesday to discuss",
    "Bees are important for agriculture because",
    "Product review: I bought this vacuum cleaner",
    "The water cycle describes",
    "Shakespeare wrote",
    "Good morning everyone, and welcome to",
    "The theory of evolution by natural selection",
    "Ancient Egypt is famous for",
)


@dataclass(frozen=True)
class GeneralSettings:
    """General text mixed into distillation: its share, objectives, weight and source."""

    ratio: float = 1.0
    """General rows per task row in every step (1: one general row per task row, as MiniLLM; 0: task only),
    taken as the nearest fraction G/T with T <= 8 (a unit of T task rows and G general rows)."""
    objectives: list[Objective] = field(default_factory=lambda: [Objective("forward_kl")])
    """The general rows' loss terms (default forward KL on logits, as Minitron)."""
    weight: float = 1.0
    """Multiplier of the general loss (per general token) beside the task loss (per task token)."""
    file: str | None = None
    """General text: a .jsonl with a `text` key per line, or a .txt file (passages split at blank lines);
    null: the teacher's own samples."""
    samples: int = 64
    """Teacher samples written when no file is given (the built-in openings, cycled)."""
    max_new_tokens: int = 128
    """Length of each teacher sample."""
    max_length: int = 128
    """General rows are cut into windows of this many tokens."""
    correct_teacher: int = 0
    """LoRA steps that first fine-tune the teacher on the general text (0: none)."""
    correct_lr: float = 1e-4
    """Learning rate of the teacher correction."""

    def __post_init__(self) -> None:
        """Refuse values with no meaning when the config is read, before any model loads."""
        config_io.at_least(self, "ratio", 0)
        config_io.at_least(self, "weight", 0)
        config_io.above(self, "correct_lr", 0)
        config_io.at_least(self, "correct_teacher", 0)
        for name in ("samples", "max_new_tokens", "max_length"):
            config_io.at_least(self, name, 1)
        check_objectives(self.objectives)
        config_io.require(
            self.ratio == 0 or Fraction(self.ratio).limit_denominator(8) > 0,
            "ratio",
            f"is below 1/8 ({self.ratio}): use at least 0.125, or 0 for no general text",
        )

    @property
    def enabled(self) -> bool:
        return self.ratio > 0


def read_file(path: str) -> list[str]:
    """The texts of a general-text file, or one line naming the file and the fix (before anything is written)."""
    file = Path(path)
    fix = "give a .jsonl file with a 'text' key on every line, or a .txt file (passages split at blank lines)"
    if not file.is_file():
        raise UserError(f"general.file {path} not found: {fix}")
    if file.suffix.lower() == ".txt":
        try:
            texts = [p.strip() for p in re.split(r"\n\s*\n", file.read_text(encoding="utf-8")) if p.strip()]
        except UnicodeDecodeError:
            raise UserError(f"general.file {path} is not UTF-8 text: re-save it as UTF-8") from None
    elif file.suffix.lower() == ".jsonl":
        try:
            records = load_records(file, fmt="text")
        except UserError:
            raise UserError(f"general.file {path} is not plain text: {fix}") from None
        texts = [r["text"] for r in records if r["text"].strip()]
    else:
        raise UserError(f"general.file {path} is a {file.suffix or 'suffix-less'} file: {fix}")
    if not texts:
        raise UserError(f"general.file {path} holds no text: {fix}")
    return texts


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """The text's n-word sequences (lowercase words; punctuation and spacing ignored)."""
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@functools.cache
def probe_ngrams(n: int = 8) -> frozenset:
    """Every n-word sequence of the perplexity probe's passages."""
    return frozenset(gram for passage in general_text() for gram in ngrams(passage, n))


def without_probe(texts: list[str], source: str) -> list[str]:
    """`texts` less any sharing an 8-word sequence with the probe (training on it would void the probe)."""
    probe = probe_ngrams()
    kept = [text for text in texts if not ngrams(text) & probe]
    if len(kept) < len(texts):
        log.warning(
            "%d of %d general texts from %s overlap the perplexity probe: dropped",
            len(texts) - len(kept),
            len(texts),
            source,
        )
    if not kept:
        raise UserError(f"every general text from {source} overlaps the perplexity probe: give other text")
    return kept


def teacher_samples(teacher, tokenizer, settings: GeneralSettings, path: Path, key: str, seed: int) -> list[str]:
    """Texts the teacher writes at temperature 1 from the built-in openings (once; cached at `path`)."""
    cached = signals.read_jsonl_cache(path, key)
    if cached is None:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings.samples)]
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        log.info(
            "general text: the teacher writes %d samples at temperature 1 (once, cached in %s)", len(encoded), path
        )
        torch.manual_seed(seed)
        outputs = signals.generate(
            teacher, encoded, settings.max_new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, True, 1.0
        )
        cached = [
            {"text": prompt + tokenizer.decode(tokens, skip_special_tokens=True)}
            for prompt, (tokens, _) in zip(prompts, outputs, strict=True)
        ]
        if ranks.is_main():  # every rank draws the same seeded samples; one writes them
            signals.write_jsonl_cache(path, key, cached)
    return [row["text"] for row in cached]


def rows(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Training rows of plain text: windows of `max_length` tokens, every token trained."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) > 1:
                out.append({"input_ids": window, "labels": list(window), "position_ids": list(range(len(window)))})
    if not out:
        raise UserError("the general text holds no window of 2 tokens or more: give longer text")
    return out


def units(task_rows: list[dict], general_rows: list[dict], ratio: float) -> list[dict]:
    """The loop's rows: T task rows and G general rows each (G / T = ratio), general rows cycled in order."""
    share = Fraction(ratio).limit_denominator(8)
    per_task, per_general = share.denominator, share.numerator
    count = len(task_rows) // per_task
    if count == 0:
        raise UserError(f"general.ratio {ratio} groups {per_task} task rows per unit, but there are {len(task_rows)}")
    if count * per_task < len(task_rows):
        log.info("general mix: %d task rows left out (units of %d)", len(task_rows) - count * per_task, per_task)
    out = []
    for u in range(count):
        task = task_rows[u * per_task : (u + 1) * per_task]
        general = [general_rows[(u * per_general + j) % len(general_rows)] for j in range(per_general)]
        out.append(
            {
                "task": task,
                "general": general,
                # what the loop's token budget measures (row_tokens counts every *input_ids list)
                "task_input_ids": [t for r in task for t in r["input_ids"]],
                "general_input_ids": [t for r in general for t in r["input_ids"]],
            }
        )
    return out


def mixed_collate(task_collate: Callable, general_collate: Callable) -> Callable[[list[dict]], dict]:
    """Units -> the task batch, with the general rows' batch under "general"."""

    def collate(batch_units: list[dict]) -> dict:
        batch = task_collate([r for unit in batch_units for r in unit["task"]])
        batch["general"] = general_collate([r for unit in batch_units for r in unit["general"]])
        return batch

    return collate


def token_ratio(mix: list[dict]) -> float:
    """Task over general scored tokens in the whole mix: the constant that puts the general loss per general
    token on the task loss's per-token scale (next-token positions with a label, as the losses count them)."""

    def scored(rows: list[dict]) -> int:
        return sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)

    task = sum(scored(unit["task"]) for unit in mix)
    general_tokens = sum(scored(unit["general"]) for unit in mix)
    return task / max(general_tokens, 1)


def mixed_loss(task_loss: Callable, general_loss: Callable, weight: float, ratio: float) -> Callable:
    """loss_fn for units: the task loss (summed over task tokens) + weight x ratio x the general loss (summed
    over general tokens), where ratio = `token_ratio(units)`. The loop divides by the step's task tokens, which
    leaves task mean + weight x general mean over the mix. A constant ratio, not each micro-batch's own, keeps
    the loss a plain sum over tokens, so N processes and any micro-batch split equal one big batch. A batch
    without general rows (validation) is scored on the task alone."""

    def loss_fn(model, batch: dict):
        if "general" not in batch:
            return task_loss(model, batch)
        task_batch = {k: v for k, v in batch.items() if k != "general"}
        loss, metrics = task_loss(model, task_batch)
        g_loss, g_metrics = general_loss(model, batch["general"])
        general = {f"general_{k}": v for k, v in g_metrics.items()}
        return loss + weight * ratio * g_loss, metrics | general

    return loss_fn


def correct_teacher(
    teacher, general_rows: list[dict], settings: GeneralSettings, pad_id: int, work: Path, seed: int, resume: bool
):
    """The teacher after `correct_teacher` LoRA steps of plain language modelling on the general rows, merged
    (through the fine-tuning path's adapter, loop and verified merge)."""
    log.info("teacher correction: %d LoRA steps on %d general rows", settings.correct_teacher, len(general_rows))
    torch.manual_seed(seed)
    model = attach_lora(teacher, LoraSettings())
    collate = functools.partial(pad_rows, pad_id=pad_id)
    steps = settings.correct_teacher
    config = TrainConfig(
        lr=settings.correct_lr, max_steps=steps, warmup_steps=min(2, steps - 1), seed=seed, save_every=steps
    )
    train(model, general_rows, causal_lm_loss, collate, config, work / "teacher_correction", resume=resume)
    model.eval()
    merged = merge_and_verify(model, [collate(general_rows[:4])])
    return merged.requires_grad_(False)
