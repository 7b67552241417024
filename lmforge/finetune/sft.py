"""`lmforge finetune`: supervised fine-tuning, full or LoRA, with a forgetting report.

Reads top to bottom: resolve data (a file, or a built-in task's train split), split off validation,
render with the chat template (completion-only loss, EOS trained), optionally pack, score the base model on
the target task and the general probe, attach LoRA (or train everything), run the one training loop with a
chunked cross-entropy, keep the best validation checkpoint, score the result on the same tasks, and write a
model folder (PEFT adapter, or merged weights verified against the adapter) with lmforge.yaml, run.json,
log.jsonl and a model card. Interrupted runs resume from `<output>.work/` with `resume: true`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge import config as config_io
from lmforge.data import synthetic
from lmforge.data.chat import render_example
from lmforge.data.packing import collate, pack
from lmforge.data.sources import load_records, split_records
from lmforge.errors import UserError
from lmforge.eval.run import evaluate, metrics_of
from lmforge.finetune.lora import LoraSettings, attach_lora, merge_and_verify
from lmforge.models.load import LoadedModel, load_model
from lmforge.outputs import staged_output
from lmforge.report.record import RunMeter, run_record, write_json
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.loop import TrainConfig, restore_best, train

log = logging.getLogger("lmforge.finetune")


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


@dataclass(frozen=True)
class EvalSettings:
    """What is scored before and after training (the forgetting report)."""

    task: str | None = None
    """Task scored on base and result; defaults to data.task."""
    limit: int = 50
    """Records of the task to score."""
    probe: bool = True
    """Also score the general text probe (forgetting)."""
    batch_size: int = 8
    """Requests per forward pass."""

    def __post_init__(self) -> None:
        """Refuse values no run can use when the config is read, before any model loads or is scored."""
        config_io.at_least(self, "limit", 1)
        config_io.at_least(self, "batch_size", 1)


@dataclass(frozen=True)
class SFTConfig:
    """A supervised fine-tuning run."""

    output: str
    """Output model folder."""
    model: str = "default"
    """Model reference: default, a folder, a .gguf file or a hub id."""
    method: Literal["lora", "full"] = "lora"
    """Train a LoRA adapter or every weight."""
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    merge: bool = False
    """Also merge the adapter into the base weights (verified against the adapter)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    resume: bool = False
    """Continue an interrupted run from <output>.work/."""


def load_records_for(cfg: SFTConfig) -> list[dict]:
    """The training records: a user file, or a built-in task's train split as prompt/completion."""
    data = cfg.data
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
    kept = [e for e in examples if any(label != -100 for label in e.labels[1:])]
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


def validation_loss(rows: list[dict], pad_id: int, batch_size: int = 8):
    """An evaluate function for the loop: mean token loss on the validation rows."""

    def score(model) -> dict:
        total, tokens = 0.0, 0
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id)
            loss, metrics = causal_lm_loss(model, batch)
            total, tokens = total + loss.item(), tokens + int(metrics["tokens"])
        return {"val_loss": total / max(tokens, 1)}

    return score


def finetune(
    config: str | Path | Mapping[str, Any] | SFTConfig | None = None, overrides: Sequence[str] = (), **settings: Any
) -> Path:
    """Fine-tune a model (SFT, LoRA or full) with a forgetting report and write its output folder; returns it.

    Args:
        config: a YAML file, a dict of the same keys, an SFTConfig, or None (defaults).
        overrides: "key.sub=value" strings, as on the command line.
        settings: config keys as keyword arguments, applied last, e.g. output="runs/sft", model="default",
            data={"task": "dates"}, train={"max_steps": 2}.
    """
    return run_sft(config_io.resolve(config, SFTConfig, overrides, **settings))


def run_sft(cfg: SFTConfig, loaded: LoadedModel | None = None, on_log: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune, report forgetting, and write the output folder; returns its path.

    `loaded` is a base model reused across runs (`lmforge tune` loads it once per study) and is left as it
    came: LoRA trains on it and unloads the adapter afterwards, even on error (the base weights stay frozen),
    while full and merged runs train a deep copy. `on_log` also receives every log record of the loop.
    """
    meter = RunMeter()
    if cfg.train.lr <= 0:
        raise UserError(f"train.lr must be > 0, got {cfg.train.lr}")
    output, work = Path(cfg.output), Path(f"{cfg.output}.work")
    if output.exists() and not (cfg.overwrite or cfg.resume):
        raise UserError(f"output folder {output} exists: set overwrite: true (or --overwrite), or resume: true")
    records = load_records_for(cfg)
    train_records, val_records = split_records(records, cfg.data.val_fraction, cfg.train.seed)
    shared = loaded is not None
    if loaded is None:
        loaded = load_model(cfg.model)
    else:  # a shallow copy, so `loaded.model = model` below leaves the caller's record alone
        copy_base = cfg.method == "full" or cfg.merge  # these change the base weights in place
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model) if copy_base else loaded.model)
    tokenizer = loaded.tokenizer
    train_rows = tokenize(train_records, tokenizer, cfg.data)
    val_rows = tokenize(val_records, tokenizer, cfg.data) if val_records else []
    tasks = [t for t in [cfg.eval.task or cfg.data.task] if t] + (["probe"] if cfg.eval.probe else [])
    before = (
        evaluate(loaded, tasks, limit=cfg.eval.limit, batch_size=cfg.eval.batch_size, footprint=False)
        if tasks
        else None
    )

    torch.manual_seed(cfg.train.seed)  # the adapter's random init is part of the run's recipe
    model = attach_lora(loaded.model, cfg.lora) if cfg.method == "lora" else loaded.model.requires_grad_(True)
    try:
        if not cfg.resume:
            shutil.rmtree(work, ignore_errors=True)
        history = train(
            model,
            train_rows,
            causal_lm_loss,
            lambda rows: collate(rows, tokenizer.pad_token_id),
            cfg.train,
            work,
            evaluate=validation_loss(val_rows, tokenizer.pad_token_id) if val_rows else None,
            resume=cfg.resume,
            on_log=_print_progress(cfg.train.max_steps, on_log),
        )
        restore_best(model, work)  # keep the best validation checkpoint, not the last step
        model.eval()
        loaded.model = model
        after = (
            evaluate(loaded, tasks, limit=cfg.eval.limit, batch_size=cfg.eval.batch_size, footprint=False)
            if tasks
            else None
        )
        _print_forgetting(before, after)

        with staged_output(output, overwrite=True) as staging:
            final = model
            if cfg.method == "lora" and cfg.merge:
                checks = [collate(val_rows[:4] or train_rows[:4], tokenizer.pad_token_id)]
                final = merge_and_verify(model, checks)
            final.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            config_io.dump(cfg, staging / "lmforge.yaml")
            shutil.copy(work / "log.jsonl", staging / "log.jsonl")
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            record = run_record(
                "finetune",
                f"sft-{cfg.method}",
                meter,
                inputs={"model": {"ref": cfg.model, "folder": str(loaded.folder)}},
                data={
                    "path": cfg.data.path,
                    "task": cfg.data.task,
                    "train_records": len(train_records),
                    "val_records": len(val_records),
                },
                config=config_io.to_dict(cfg),
                tokens_seen=sum(h.get("input_tokens", 0) for h in history if "loss" in h),
                params_total=sum(p.numel() for p in final.parameters()),
                params_trainable=trainable,
                metrics=metrics_of(after) if after else {},
            )
            record["base_metrics"] = metrics_of(before) if before else {}
            write_json(staging / "run.json", record)
            (staging / "README.md").write_text(_model_card(cfg, before, after), encoding="utf-8")
        shutil.rmtree(work, ignore_errors=True)
        return output
    finally:
        if shared and cfg.method == "lora" and not cfg.merge:
            model.unload().eval()  # hand the shared base back without LoRA layers


def _print_progress(max_steps: int, also: Callable[[dict], None] | None = None):
    """Log each step with loss, throughput and time left, and each evaluation; then call `also`."""
    seen = {"input_tokens": 0}

    def show(entry: dict) -> None:
        if also is not None:
            also(entry)
        if "loss" in entry:
            seen["input_tokens"] += entry.get("input_tokens", 0)
            elapsed = max(entry["elapsed_s"], 1e-9)
            eta = elapsed / entry["step"] * (max_steps - entry["step"])
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %.0fs elapsed  ETA %.0fs",
                entry["step"],
                max_steps,
                entry["loss"],
                entry["lr"],
                seen["input_tokens"] / elapsed,
                elapsed,
                eta,
            )
        elif "eval" in entry:
            log.info("step %d  eval %s", entry["step"], entry["eval"])

    return show


def _forgetting_rows(before: dict | None, after: dict | None) -> list[tuple[str, str, float, float]]:
    if not before or not after:
        return []
    rows = []
    for task, metrics in metrics_of(before).items():
        for metric, cell in metrics.items():
            if metric in ("exact_match", "acc", "perplexity"):
                rows.append((task, metric, cell["value"], metrics_of(after)[task][metric]["value"]))
    return rows


def _print_forgetting(before: dict | None, after: dict | None) -> None:
    for task, metric, base, result in _forgetting_rows(before, after):
        log.info("%s %s: base %.4f -> fine-tuned %.4f (%+.4f)", task, metric, base, result, result - base)


def _model_card(cfg: SFTConfig, before: dict | None, after: dict | None) -> str:
    lines = [
        f"# {Path(cfg.output).name}",
        "",
        f"Fine-tuned from `{cfg.model}` by lmforge ({cfg.method} SFT).",
        "",
        "| task | metric | base | fine-tuned | delta |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {b:.4f} | {r:.4f} | {r - b:+.4f} |" for t, m, b, r in _forgetting_rows(before, after)]
    return "\n".join(lines + ["", "The full recipe is in lmforge.yaml; costs and scores in run.json."]) + "\n"
