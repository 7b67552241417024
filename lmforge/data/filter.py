"""`lmforge data filter`: drop training records that would teach the wrong thing, and say why each went.

Rules, cheapest first; a record is dropped by the first rule it fails, and that rule is its reason:
- `truncated`: rendered with the model's chat template it is longer than `max_length` (training would cut it);
- `repetitive`: its completion's share of repeated 4-grams exceeds `max_repeat` (the check sequence-level
  distillation applies to teacher texts, `distill.signals.repeat_share`);
- `wrong_answer` / `unverifiable`: with `verify: TASK`, the completion differs from the built-in task's exact
  answer recomputed from the prompt (data/answers.py), or the prompt is not of that task's shape;
- `nll_high` / `nll_low`: the model's mean negative log-likelihood per answer token, given the prompt,
  is outside [nll_min, nll_max] (the teacher finds the answer implausible, or trivial);
- `ifd_high` / `ifd_low`: instruction-following difficulty outside [ifd_min, ifd_max]. IFD (Li et al.,
  arXiv 2308.12032) is the answer's loss given the prompt over its loss alone; above 1 the prompt does not
  help predict the answer, the paper's sign of a misaligned pair;
- `not_selected`: with `keep_fraction`, the survivors outside that share when ranked by `keep_by` (the
  paper keeps the highest IFD).
Writes OUTPUT/kept.jsonl ({prompt, completion}, in input order), OUTPUT/dropped.jsonl (each dropped record
with its reason and scores), OUTPUT/scores.jsonl (index, reason or "kept", NLL and IFD of every scored record),
OUTPUT/reasons.csv (the table of reasons) and OUTPUT/filter.json, staged and
renamed into place; a filter that would keep nothing writes nothing and says which rule emptied it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge import config as config_io
from lmforge.data.answers import SOLVERS
from lmforge.data.chat import chat_prompt, render_example
from lmforge.data.prepare import DataSettings, training_records
from lmforge.distill.signals import repeat_share
from lmforge.errors import UserError
from lmforge.eval.scoring import final_hidden_states, padded, target_logprobs

log = logging.getLogger("lmforge.data")
REASONS = (
    "truncated",
    "repetitive",
    "wrong_answer",
    "unverifiable",
    "nll_high",
    "nll_low",
    "ifd_high",
    "ifd_low",
    "not_selected",
)


@dataclass(frozen=True)
class FilterConfig:
    """A filter run: which records, which model scores them, and the bounds each record must meet."""

    output: str
    """Output folder: kept.jsonl, dropped.jsonl, reasons.csv, filter.json."""
    data: str | None = None
    """Data file or folder of prompt/completion records (any format `lmforge data preview` reads but chat
    and preference data)."""
    task: str | None = None
    """A built-in task's train split instead of `data`."""
    format: str | None = None
    """Force the data format instead of detecting it."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical key -> your key, e.g. {prompt: question, completion: answer}."""
    limit: int | None = None
    """Filter only the first N records."""
    model: str = "default"
    """Scores IFD and NLL (usually the distillation teacher); its tokenizer renders records."""
    max_length: int = 512
    """Longest rendered record in tokens (data.max_length of the training run)."""
    max_repeat: float | None = 0.5
    """Largest share of repeated 4-grams in a completion (null: no repetition check)."""
    verify: str | None = None
    """Built-in task whose exact answers the completions must equal (dates, arithmetic, ...)."""
    nll_max: float | None = None
    """Largest mean NLL per answer token given the prompt, in nats."""
    nll_min: float | None = None
    """Smallest mean NLL per answer token given the prompt, in nats."""
    ifd_max: float | None = 1.0
    """Largest IFD (1: the prompt must help predict the answer, the paper's rule; null: no bound)."""
    ifd_min: float | None = None
    """Smallest IFD."""
    keep_fraction: float | None = None
    """After the rules, keep this share of the survivors, ranked by keep_by (null: keep every survivor)."""
    keep_by: Literal["ifd_high", "ifd_low", "nll_low", "nll_high"] = "ifd_high"
    """Ranking for keep_fraction: ifd_high is the paper's selection of the hardest instructions."""
    batch_size: int = 8
    """Sequences per forward pass while scoring."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self) -> None:
        """Refuse values with no meaning when the config is read, before any model loads."""
        config_io.require((self.data is None) != (self.task is None), "data", "or task: give exactly one of them")
        for name in ("max_length", "batch_size", "limit"):
            config_io.at_least(self, name, 1)
        config_io.within(self, "max_repeat", 0, 1)
        for name in ("nll_max", "nll_min", "ifd_max", "ifd_min"):
            config_io.at_least(self, name, 0)
        for low, high in (("nll_min", "nll_max"), ("ifd_min", "ifd_max")):
            lo, hi = getattr(self, low), getattr(self, high)
            config_io.require(lo is None or hi is None or lo <= hi, low, f"({lo}) must not exceed {high} ({hi})")
        keep = self.keep_fraction
        config_io.require(keep is None or 0 < keep <= 1, "keep_fraction", f"must be in (0, 1], got {keep!r}")
        known = ", ".join(SOLVERS)
        config_io.require(self.verify is None or self.verify in SOLVERS, "verify", f"must be one of {known}")

    @property
    def scores(self) -> bool:
        """Whether any rule needs the model's forward passes."""
        bounds = (self.nll_max, self.nll_min, self.ifd_max, self.ifd_min, self.keep_fraction)
        return any(bound is not None for bound in bounds)


@dataclass
class FilterResult:
    """What a filter run kept and dropped."""

    output: Path
    total: int
    kept: int
    reasons: dict[str, int]
    seconds: float


def filter_data(
    config: str | Path | Mapping[str, Any] | FilterConfig | None = None, overrides: Sequence[str] = (), **keys: Any
) -> FilterResult:
    """Filter a data file (or a built-in task's train split) and write the kept and dropped records.

    Args:
        config: a YAML file, a dict of FilterConfig keys, a FilterConfig, or None (keys as keyword arguments).
        overrides: "key=value" strings over the config.
    Returns:
        The output folder and the counts per reason.
    Raises:
        UserError: bad settings or data, or a filter that would keep no record (nothing is written).
    """
    from lmforge.models.load import load_model
    from lmforge.outputs import staged_output

    cfg = config_io.resolve(config, FilterConfig, overrides, **keys)
    started = time.perf_counter()
    if Path(cfg.output).exists() and not cfg.overwrite:
        raise UserError(f"output folder {cfg.output} exists: pass --overwrite or choose another folder")
    records = _read(cfg)
    loaded = load_model(cfg.model)
    reasons: list[str | None] = [None] * len(records)
    scores: list[dict] = [{} for _ in records]
    _cheap_rules(cfg, loaded.tokenizer, records, reasons)
    if cfg.scores:
        alive = [i for i, reason in enumerate(reasons) if reason is None]
        losses = answer_losses(loaded.model, loaded.tokenizer, [records[i] for i in alive], cfg.batch_size)
        for index, (conditioned, alone) in zip(alive, losses, strict=True):
            scores[index] = {"nll": conditioned, "nll_alone": alone, "ifd": conditioned / alone}
            reasons[index] = _score_rule(cfg, scores[index])
        _select(cfg, reasons, scores)
    counts = Counter(reason for reason in reasons if reason is not None)
    kept = [record for record, reason in zip(records, reasons, strict=True) if reason is None]
    if not kept:
        worst = ", ".join(f"{reason} {count}" for reason, count in counts.most_common())
        raise UserError(f"the filter would keep none of {len(records)} records (dropped: {worst}): loosen those rules")
    with staged_output(cfg.output, cfg.overwrite) as staging:
        _write_jsonl(staging / "kept.jsonl", kept)
        dropped = [
            {"index": i, "reason": reason, **records[i], **scores[i]}
            for i, reason in enumerate(reasons)
            if reason is not None
        ]
        _write_jsonl(staging / "dropped.jsonl", dropped)
        scored = [{"index": i, "reason": reasons[i] or "kept", **scores[i]} for i in range(len(records)) if scores[i]]
        _write_jsonl(staging / "scores.jsonl", scored)
        (staging / "reasons.csv").write_text(reasons_csv(counts, len(records)), encoding="utf-8")
        seconds = time.perf_counter() - started
        summary = {
            "config": config_io.to_dict(cfg),
            "records": len(records),
            "kept": len(kept),
            "dropped": dict(counts),
        }
        (staging / "filter.json").write_text(json.dumps({**summary, "wall_s": seconds}, indent=2), encoding="utf-8")
    return FilterResult(Path(cfg.output), len(records), len(kept), dict(counts), seconds)


def _read(cfg: FilterConfig) -> list[dict]:
    settings = DataSettings(path=cfg.data, task=cfg.task, format=cfg.format, columns=cfg.columns, limit=cfg.limit)
    records = training_records(settings)
    if "completion" not in records[0]:
        raise UserError(
            f"{cfg.data}: the filter reads prompt/completion records (or prompt/answer, alpaca), not "
            f"{records[0]['format']}: map your keys with columns: {{prompt: KEY, completion: KEY}}"
        )
    return [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]


def _cheap_rules(cfg: FilterConfig, tokenizer, records: list[dict], reasons: list[str | None]) -> None:
    """The rules that need only the tokenizer or the task: truncation, repetition, the exact answer."""
    solve = SOLVERS[cfg.verify] if cfg.verify else None
    for index, record in enumerate(records):
        if render_example(tokenizer, record, cfg.max_length).truncated:
            reasons[index] = "truncated"
            continue
        tokens = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if cfg.max_repeat is not None and repeat_share(tokens) > cfg.max_repeat:
            reasons[index] = "repetitive"
            continue
        if solve is not None:
            answer = solve(record["prompt"])
            if answer is None:
                reasons[index] = "unverifiable"
            elif record["completion"].strip() != answer:
                reasons[index] = "wrong_answer"


def _score_rule(cfg: FilterConfig, score: dict) -> str | None:
    for name, value, low, high in (
        ("nll", score["nll"], cfg.nll_min, cfg.nll_max),
        ("ifd", score["ifd"], cfg.ifd_min, cfg.ifd_max),
    ):
        if high is not None and value > high:
            return f"{name}_high"
        if low is not None and value < low:
            return f"{name}_low"
    return None


def _select(cfg: FilterConfig, reasons: list[str | None], scores: list[dict]) -> None:
    """Keep the best `keep_fraction` of the survivors by `keep_by`; mark the rest not_selected."""
    if cfg.keep_fraction is None:
        return
    alive = [i for i, reason in enumerate(reasons) if reason is None]
    metric, order = cfg.keep_by.split("_")
    ranked = sorted(alive, key=lambda i: scores[i][metric], reverse=order == "high")
    for index in ranked[round(cfg.keep_fraction * len(alive)) :]:
        reasons[index] = "not_selected"


@torch.no_grad()
def answer_losses(model, tokenizer, records: list[dict], batch_size: int = 8) -> list[tuple[float, float]]:
    """(loss given the prompt, loss alone) of each record's completion: mean NLL per completion token, nats.

    The same completion tokens are scored both ways: after the chat-templated prompt, and after only the
    BOS (else EOS) token, as an unconditioned text starts. IFD is the first over the second.
    """
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    windows: list[tuple[list[int], int]] = []
    for record in records:
        answer = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        if not answer:
            raise UserError(f"record with prompt {record['prompt'][:60]!r} has an empty completion: remove it")
        context = tokenizer(chat_prompt(tokenizer, record["prompt"]), add_special_tokens=False)["input_ids"]
        windows += [(context + answer, len(answer)), ([start, *answer], len(answer))]
    losses = _mean_nll(model, windows, tokenizer.pad_token_id or 0, batch_size)
    return [(losses[i], losses[i + 1]) for i in range(0, len(losses), 2)]


def _mean_nll(model, windows: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> list[float]:
    """Mean NLL of the last n tokens of each (ids, n) window, batched longest first, padded on the right."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = [0.0] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        ids, mask = padded([windows[i][0] for i in batch], pad_id, left=False)
        states, are_logits = final_hidden_states(model, ids.to(device), mask.to(device))  # (batch, seq, d)
        head = (lambda x: x) if are_logits else model.get_output_embeddings()
        for row, index in enumerate(batch):
            tokens, count = windows[index]
            end = len(tokens)
            target = torch.tensor(tokens[end - count :], device=device)
            total, _ = target_logprobs(head, states[row, end - count - 1 : end - 1], target)
            losses[index] = -total / count
    model.train(was_training)
    return losses


def reasons_csv(counts: Mapping[str, int], total: int) -> str:
    """The table of reasons as CSV: reason, records, share of all records (kept first)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["reason", "records", "share"])
    kept = total - sum(counts.values())
    writer.writerow(["kept", kept, f"{kept / total:.4f}"])
    for reason in REASONS:
        if counts.get(reason):
            writer.writerow([reason, counts[reason], f"{counts[reason] / total:.4f}"])
    return buffer.getvalue()


def print_reasons(result: FilterResult, console) -> None:
    """The kept and dropped counts as a rich table."""
    from rich.table import Table

    table = Table(title=f"data filter: kept {result.kept} of {result.total} records")
    for column in ("reason", "records", "share"):
        table.add_column(column, justify="left" if column == "reason" else "right")
    for row in list(csv.reader(io.StringIO(reasons_csv(result.reasons, result.total))))[1:]:
        table.add_row(row[0], row[1], f"{float(row[2]):.1%}")
    console.print(table)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
