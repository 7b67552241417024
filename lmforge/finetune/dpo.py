"""`lmforge dpo`: preference tuning of a LoRA adapter with the DPO or IPO loss, through the one training loop.

Reads top to bottom: load preference pairs {prompt, chosen, rejected}, render each side with the chat template
(completion-only labels, EOS trained), attach LoRA, score every pair ONCE under the reference model, train, and
write the same folder as `lmforge finetune` (adapter, tokenizer, lmforge.yaml, run.json, log.jsonl, card).
The reference is the frozen base itself, and it is only ever needed before training: every pair's reference
log-probs are computed once up front (LoRA: the same PeftModel with its adapter disabled; full: the model before
its first step), so no second copy of the weights exists for either method. A micro-batch stacks the chosen
then the rejected sides of its pairs, and `num_items` = pairs makes the loop average the summed loss per pair.
Losses: DPO sigmoid (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7) and IPO (Azar et al. 2023,
https://arxiv.org/abs/2310.12036, eq. 17). As TRL does, IPO uses log-probs averaged over completion tokens.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge import config as config_io
from lmforge.data.chat import IGNORE_INDEX, render_example
from lmforge.data.sources import load_records, split_records
from lmforge.errors import UserError
from lmforge.eval.forgetting import EvalSettings, forgetting_table, print_forgetting, report_tasks, score
from lmforge.eval.run import metrics_of
from lmforge.finetune.lora import LoraSettings, attach_lora
from lmforge.models.load import load_model
from lmforge.outputs import CardTable, model_card, save_model, staged_output, write_run_files
from lmforge.report.record import RunMeter, run_record
from lmforge.train.chunked import on_model_device, sequence_logprobs
from lmforge.train.loop import TrainConfig, restore_best, tokens_seen, train
from lmforge.train.progress import print_progress
from lmforge.train.validation import validation
from lmforge.train.workdir import on_interrupt, save_run_config, start_run

log = logging.getLogger("lmforge.dpo")


def sigmoid_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """DPO: -log sigmoid(beta * ((pc - rc) - (pr - rr))) [Rafailov et al. 2023, eq. 7]."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -F.logsigmoid(beta * logits)


def ipo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> Tensor:
    """IPO: (logits - 1 / (2 beta))^2, beta playing the paper's tau [Azar et al. 2023, eq. 17]: a bounded target
    margin instead of DPO's push to infinity on deterministic preferences."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return (logits - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[..., Tensor]] = {"sigmoid": sigmoid_loss, "ipo": ipo_loss}


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> Tensor:
    """Per-pair preference loss from sequence log-probs.

    Args:
        policy_chosen, policy_rejected: (pairs,) log-probs of the chosen / rejected completions under the policy.
        ref_chosen, ref_rejected: (pairs,) the same under the reference model.
        beta: strength of the KL regulariser (> 0).
        loss_type: a key of DPO_LOSSES. For "ipo" pass length-averaged log-probs to follow TRL (run_dpo does).

    Returns:
        (pairs,) losses, not reduced.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss_type '{loss_type}': use one of {', '.join(DPO_LOSSES)}")
    return DPO_LOSSES[loss_type](policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


@dataclass(frozen=True)
class PreferenceData:
    """Where the preference pairs come from and how they are tokenised."""

    path: str | None = None
    """A preference data file or folder: records {prompt, chosen, rejected}."""
    format: str | None = None
    """Force the data format instead of detecting it (must end up preference)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical key -> your key, e.g. {chosen: good, rejected: bad}."""
    val_fraction: float = 0.05
    """Share of pairs held out for the validation loss and reward accuracy."""
    max_length: int = 512
    """Longer prompt + completion sequences are truncated (and counted)."""
    limit: int | None = None
    """Use only the first N pairs."""

    def __post_init__(self) -> None:
        """Refuse values no run can use when the config is read, before any model loads."""
        config_io.within(self, "val_fraction", 0, 1, high_open=True)
        config_io.at_least(self, "max_length", 1)
        config_io.at_least(self, "limit", 1)


@dataclass(frozen=True)
class DPOConfig:
    """A preference-tuning run (LoRA or full)."""

    output: str
    """Output model folder."""
    model: str = "default"
    """Model reference: default, a folder, a .gguf file or a hub id (ideally an SFT result)."""
    beta: float = 0.1
    """KL strength: higher keeps the policy closer to the reference."""
    method: Literal["lora", "full"] = "lora"
    """lora (the adapter-disabled model is the reference) or full (reference log-probs taken before step one)."""
    data: PreferenceData = field(default_factory=PreferenceData)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO) or ipo."""
    overwrite: bool = False
    """Replace an existing output folder."""
    resume: bool = False
    """Continue an interrupted run from <output>.work/."""

    def __post_init__(self) -> None:
        config_io.above(self, "beta", 0)


def tokenize_pairs(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """One row per pair: both sides rendered like SFT examples; pairs where a side has no label are dropped."""
    rows, truncated = [], 0
    for record in records:
        sides = [
            render_example(tokenizer, {"prompt": record["prompt"], "completion": record[key]}, max_length)
            for key in ("chosen", "rejected")
        ]
        truncated += any(side.truncated for side in sides)
        if all(any(label != IGNORE_INDEX for label in side.labels[1:]) for side in sides):
            rows.append(
                {
                    "chosen_input_ids": sides[0].input_ids,
                    "chosen_labels": sides[0].labels,
                    "rejected_input_ids": sides[1].input_ids,
                    "rejected_labels": sides[1].labels,
                }
            )
    if truncated:
        log.warning(
            "%d of %d pairs were longer than data.max_length=%d and truncated", truncated, len(records), max_length
        )
    if records and not rows:
        raise UserError("no pair has trainable completion tokens on both sides: raise data.max_length")
    if len(rows) < len(records):
        log.warning(
            "%d pairs had no completion tokens left after truncation and were dropped", len(records) - len(rows)
        )
    return rows


def collate_pairs(rows: list[dict], pad_id: int) -> dict:
    """Right-pad the chosen sides then the rejected sides into one (2 x pairs, width) batch.

    Carries the pairs' reference log-probs (pairs,) when the rows have them, and num_items = pairs so the loop
    averages per pair, not per token.
    """
    sides = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows]
    sides += [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    width = max(len(ids) for ids, _ in sides)
    batch: dict = {
        "input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in sides]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for _, labels in sides]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in sides]),
        "num_items": len(rows),
    }
    if "ref_chosen" in rows[0]:
        batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows], dtype=torch.float32)
    return batch


def add_reference_logprobs(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> list[dict]:
    """Score every pair once under the reference (the model as it is, adapter disabled), so training never runs it."""
    was_training = model.training
    model.eval()
    out = []
    from peft import PeftModel  # after lmforge.models.compat (via load): bitsandbytes offline

    base_only = model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
    with torch.no_grad(), base_only:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            logps = sequence_logprobs(model, collate_pairs(chunk, pad_id)).tolist()
            n = len(chunk)
            out += [
                row | {"ref_chosen": c, "ref_rejected": r}
                for row, c, r in zip(chunk, logps[:n], logps[n:], strict=True)
            ]
    model.train(was_training)
    return out


def make_loss_fn(beta: float, loss_type: str, chunk_size: int = 1024):
    """A loop loss_fn: (model, batch) -> (loss summed over the batch's pairs, metrics)."""

    def loss_fn(model, batch: dict) -> tuple[Tensor, dict]:
        n, batch = batch["num_items"], on_model_device(model, batch)  # evaluators pass CPU batches
        logps = sequence_logprobs(model, batch, chunk_size)  # (2n,) chosen then rejected
        ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]]).to(logps)
        if loss_type == "ipo":  # TRL's IPO: mean log-prob per completion token
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).clamp_min(1)
            logps, ref = logps / tokens, ref / tokens
        losses = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type)
        chosen_reward = beta * (logps[:n] - ref[:n]).detach()
        rejected_reward = beta * (logps[n:] - ref[n:]).detach()
        metrics = {
            "pairs": n,
            "loss": losses.mean().item(),
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean().item(),
            "reward_margin": (chosen_reward - rejected_reward).mean().item(),
        }
        return losses.sum(), metrics

    return loss_fn


def preference_metrics(rows: list[dict], pad_id: int, loss_fn, batch_size: int = 8):
    """An evaluate function for the loop: pair-weighted loss, reward accuracy and margin over `rows`."""
    collate = functools.partial(collate_pairs, pad_id=pad_id)
    return validation(rows, collate, loss_fn, batch_size, "pairs", "loss", ("reward_accuracy", "reward_margin"))


def dpo(
    config: str | Path | Mapping[str, Any] | DPOConfig | None = None, overrides: Sequence[str] = (), **settings: Any
) -> Path:
    """Preference-tune a model (DPO or IPO, LoRA or full) and write its output folder; returns the folder.

    Takes its config as `finetune` does: a YAML file, a dict of the same keys, a DPOConfig or None, then
    "key.sub=value" overrides, then keyword settings applied last, e.g.
    dpo(output="runs/dpo", data={"path": "prefs.jsonl"}, train={"max_steps": 2}).
    """
    return run_dpo(config_io.resolve(config, DPOConfig, overrides, **settings))


def _check(cfg: DPOConfig) -> None:
    if not cfg.data.path:
        raise UserError("data.path is required: a preference file with prompt, chosen and rejected per record")


def load_pairs(data: PreferenceData) -> list[dict]:
    """The preference records of data.path; any other format is a user error."""
    records = load_records(data.path, fmt=data.format, columns=data.columns or None)
    if records[0]["format"] != "preference":
        raise UserError(
            f"{data.path} holds {records[0]['format']} records, not preference pairs: DPO needs prompt, chosen and "
            "rejected (map yours with data.columns), or train it with lmforge finetune"
        )
    return records[: data.limit] if data.limit else records


def run_dpo(cfg: DPOConfig, on_log: Callable[[dict], None] | None = None) -> Path:
    """Preference-tune (LoRA or full), report forgetting, and write the output folder; returns its path.

    `on_log` also receives every log record of the loop."""
    meter = RunMeter()
    _check(cfg)
    output, work = start_run(cfg)
    records = load_pairs(cfg.data)
    train_records, val_records = split_records(records, cfg.data.val_fraction, cfg.train.seed)
    loaded = load_model(cfg.model, quantize=cfg.lora.quantize if cfg.method == "lora" else None)
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    train_rows = tokenize_pairs(train_records, tokenizer, cfg.data.max_length)
    val_rows = tokenize_pairs(val_records, tokenizer, cfg.data.max_length)
    tasks = report_tasks(cfg.eval)
    before = score(loaded, tasks, cfg.eval)

    torch.manual_seed(cfg.train.seed)  # the adapter's random init is part of the run's recipe
    model = attach_lora(loaded.model, cfg.lora) if cfg.method == "lora" else loaded.model.requires_grad_(True)
    train_rows = add_reference_logprobs(model, train_rows, pad_id, cfg.train.batch_size)
    val_rows = add_reference_logprobs(model, val_rows, pad_id, cfg.train.batch_size)
    loss_fn = make_loss_fn(cfg.beta, cfg.loss_type)
    save_run_config(cfg, work)
    score_val = preference_metrics(val_rows, pad_id, loss_fn, cfg.eval.batch_size) if val_rows else None
    with on_interrupt(work):
        history = train(
            model,
            train_rows,
            loss_fn,
            lambda rows: collate_pairs(rows, pad_id),
            cfg.train,
            work,
            evaluate=score_val,
            resume=cfg.resume,
            on_log=print_progress(cfg.train.max_steps, on_log),
        )
    restore_best(model, work)  # keep the best validation checkpoint, not the last step
    model.eval()
    preference = {"train": preference_metrics(train_rows[:256], pad_id, loss_fn, cfg.eval.batch_size)(model)}
    if score_val:
        preference["val"] = score_val(model)
    loaded.model = model
    after = score(loaded, tasks, cfg.eval)
    print_forgetting(before, after)
    method = f"dpo-{cfg.loss_type}"

    with staged_output(output, overwrite=True) as staging:
        save_model(staging, model, tokenizer)
        record = run_record(
            "finetune",
            method,
            meter,
            inputs={"model": {"ref": cfg.model, "folder": str(loaded.folder)}},
            data={"path": cfg.data.path, "train_records": len(train_records), "val_records": len(val_records)},
            config=config_io.to_dict(cfg),
            tokens_seen=tokens_seen(history),
            params_total=sum(p.numel() for p in model.parameters()),
            params_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
            metrics=metrics_of(after) if after else {},
        )
        record["base_metrics"] = metrics_of(before) if before else {}
        record["preference"] = preference
        write_run_files(staging, cfg, record, _model_card(cfg, preference, before, after), work / "log.jsonl")
    shutil.rmtree(work, ignore_errors=True)
    return output


def _model_card(cfg: DPOConfig, preference: dict, before: dict | None, after: dict | None) -> str:
    sentence = f"Preference-tuned from `{cfg.model}` by lmforge ({cfg.method}, {cfg.loss_type} loss, beta {cfg.beta})."
    pairs = [
        [split, f"{m['loss']:.4f}", f"{m['reward_accuracy']:.3f}", f"{m['reward_margin']:+.4f}"]
        for split, m in preference.items()
    ]
    table = CardTable(["pairs", "loss", "reward accuracy", "reward margin"], pairs)
    return model_card(Path(cfg.output).name, sentence, [table, forgetting_table(before, after, "tuned")])
