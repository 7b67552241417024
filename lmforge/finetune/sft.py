"""`lmforge finetune`: supervised fine-tuning, full or LoRA, with a forgetting report.

Reads top to bottom: resolve data (a file, or a built-in task's train split), split off validation,
render with the chat template (completion-only loss, EOS trained), optionally pack, score the base model on
the target task and the general probe, attach LoRA (or train everything), run the one training loop with a
chunked cross-entropy, keep the best validation checkpoint, score the result on the same tasks, and write a
model folder (PEFT adapter, or merged weights verified against the adapter) with lmforge.yaml, run.json,
log.jsonl and a model card. Interrupted runs resume from `<output>.work/` with `resume: true`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge import config as config_io
from lmforge.data.packing import collate
from lmforge.data.prepare import DataSettings, tokenize, training_records
from lmforge.data.sources import split_records
from lmforge.eval.forgetting import EvalSettings, forgetting_table, print_forgetting, report_tasks, score
from lmforge.eval.run import metrics_of
from lmforge.finetune.lora import LoraSettings, attach_lora, merge_and_verify
from lmforge.models.load import LoadedModel, load_model
from lmforge.outputs import model_card, save_model, staged_output, write_run_files
from lmforge.report.record import RunMeter, run_record
from lmforge.train.chunked import causal_lm_loss
from lmforge.train.loop import TrainConfig, restore_best, tokens_seen, train
from lmforge.train.progress import print_progress
from lmforge.train.validation import validation
from lmforge.train.workdir import on_interrupt, save_run_config, start_run


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


def validation_loss(rows: list[dict], pad_id: int, batch_size: int = 8):
    """An evaluate function for the loop: mean token loss on the validation rows."""
    return validation(rows, lambda chunk: collate(chunk, pad_id), causal_lm_loss, batch_size)


def finetune(
    config: str | Path | Mapping[str, Any] | SFTConfig | None = None, overrides: Sequence[str] = (), **settings: Any
) -> Path:
    """Fine-tune a model (SFT, LoRA or full) with a forgetting report and write its output folder; returns it.

    The run is `config` (a YAML file, a dict of the same keys, an SFTConfig, or None for the defaults), then the
    "key.sub=value" `overrides` as on the command line, then the keyword `settings` (config keys, applied last),
    e.g. finetune(output="runs/sft", model="default", data={"task": "dates"}, train={"max_steps": 2}).
    """
    return run_sft(config_io.resolve(config, SFTConfig, overrides, **settings))


def run_sft(
    cfg: SFTConfig,
    loaded: LoadedModel | None = None,
    on_log: Callable[[dict], None] | None = None,
    base_scores: dict | None = None,
) -> Path:
    """Fine-tune, report forgetting, and write the output folder; returns its path.

    `loaded` is a base model reused across runs (`lmforge tune` loads it once per study) and is left as it
    came: LoRA trains on it and unloads the adapter afterwards, even on error (the base weights stay frozen),
    while full and merged runs train a deep copy. `on_log` also receives every log record of the loop.
    `base_scores` are the base model's scores on the report's tasks when the caller has them (`lmforge tune`
    scores the base once per study, not once per trial).
    """
    meter = RunMeter()
    output, work = start_run(cfg)
    records = training_records(cfg.data)
    train_records, val_records = split_records(records, cfg.data.val_fraction, cfg.train.seed)
    shared = loaded is not None
    if loaded is None:
        loaded = load_model(cfg.model, quantize=cfg.lora.quantize if cfg.method == "lora" else None)
    else:  # a shallow copy, so `loaded.model = model` below leaves the caller's record alone
        copy_base = cfg.method == "full" or cfg.merge  # these change the base weights in place
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model) if copy_base else loaded.model)
    tokenizer = loaded.tokenizer
    train_rows = tokenize(train_records, tokenizer, cfg.data)
    val_rows = tokenize(val_records, tokenizer, cfg.data) if val_records else []
    tasks = report_tasks(cfg.eval, cfg.data.task)
    before = base_scores if base_scores is not None else score(loaded, tasks, cfg.eval)

    torch.manual_seed(cfg.train.seed)  # the adapter's random init is part of the run's recipe
    model = attach_lora(loaded.model, cfg.lora) if cfg.method == "lora" else loaded.model.requires_grad_(True)
    try:
        save_run_config(cfg, work)
        # a tune trial is not resumed on its own (tune removes its work folder): no resume hint there
        with contextlib.nullcontext() if shared else on_interrupt(work):
            history = train(
                model,
                train_rows,
                causal_lm_loss,
                lambda rows: collate(rows, tokenizer.pad_token_id),
                cfg.train,
                work,
                evaluate=validation_loss(val_rows, tokenizer.pad_token_id) if val_rows else None,
                resume=cfg.resume,
                on_log=print_progress(cfg.train.max_steps, on_log),
            )
        restore_best(model, work)  # keep the best validation checkpoint, not the last step
        model.eval()
        loaded.model = model
        after = score(loaded, tasks, cfg.eval)
        print_forgetting(before, after)

        with staged_output(output, overwrite=True) as staging:
            final = model
            if cfg.method == "lora" and cfg.merge:
                checks = [collate(val_rows[:4] or train_rows[:4], tokenizer.pad_token_id)]
                final = merge_and_verify(model, checks)
            save_model(staging, final, tokenizer)
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
                tokens_seen=tokens_seen(history),
                params_total=sum(p.numel() for p in final.parameters()),
                params_trainable=trainable,
                metrics=metrics_of(after) if after else {},
            )
            record["base_metrics"] = metrics_of(before) if before else {}
            sentence = f"Fine-tuned from `{cfg.model}` by lmforge ({cfg.method} SFT)."
            card = model_card(output.name, sentence, [forgetting_table(before, after)])
            write_run_files(staging, cfg, record, card, work / "log.jsonl")
        shutil.rmtree(work, ignore_errors=True)
        return output
    finally:
        if shared and cfg.method == "lora" and not cfg.merge:
            model.unload().eval()  # hand the shared base back without LoRA layers
