"""LoRA through PEFT: attach by module-name match, verify target modules, merge and verify.

Thin over `peft` [peft]: the one thing added is checking. Target modules that match nothing are a user
error naming the modules the model has; a merged model must give the adapter's logits on a few batches, or
the merge is refused instead of silently writing a divergent model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.models import quantize
from lmforge.models.compat import checkpointing_rename_quiet
from lmforge.train.chunked import on_model_device


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapter shape (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

    r: int = 16
    """Rank of the update."""
    alpha: float = 32.0
    """Scale numerator: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module name suffixes to adapt, or ["all-linear"] for every linear layer but the output head."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)."""
    dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353)."""
    quantize: Literal["nf4", "int8"] | None = None
    """QLoRA: load the frozen base quantised through bitsandbytes (`pip install 'lmforge[qlora]'`), nf4 with
    double quantisation or LLM.int8; the adapter trains in float on top (models/quantize.py). null: float base."""

    def __post_init__(self) -> None:
        """Refuse shapes no adapter can have when the config is read, before any model loads."""
        config_io.at_least(self, "r", 1)
        config_io.above(self, "alpha", 0)
        config_io.within(self, "dropout", 0, 1, high_open=True)
        config_io.require(bool(self.target_modules), "target_modules", "is empty: name some modules, or all-linear")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name parts of the model's linear layers (what target_modules may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_lora(model: torch.nn.Module, settings: LoraSettings):
    """Wrap `model` with a fresh LoRA adapter; only adapter weights stay trainable. A base loaded quantised
    (lora.quantize) is first prepared by PEFT for k-bit training."""
    from peft import LoraConfig, get_peft_model

    if quantize.is_quantized(model):
        model = quantize.prepare_for_training(model)

    targets: str | list[str] = settings.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:
        known = linear_module_names(model)
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise UserError(
                f"lora.target_modules {unknown} match no linear layer of this model: use some of "
                f"{', '.join(known)} or all-linear"
            )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        task_type="CAUSAL_LM",
    )
    with checkpointing_rename_quiet():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        return get_peft_model(model, config)


def merge_and_verify(peft_model, batches: list[dict], atol: float = 1e-3) -> torch.nn.Module:
    """Merge the adapter into the base weights; refuse if merged logits differ from the adapter's.

    A merge can drift where the base weights are too coarse to hold the update (bfloat16 rounds a small
    `B @ A` away), so the merged model is checked against the adapter on `batches`, real token positions
    only, before anything is written. A quantised base (QLoRA) is dequantised first and the adapter merged
    into the float weights: the check is then against the adapter on exactly those weights, in float32.
    """
    if quantize.is_quantized(peft_model):
        peft_model = quantize.onto_dequantized_base(peft_model)
    peft_model.eval()
    batches = [on_model_device(peft_model, b) for b in batches]
    with torch.no_grad():
        expected = [peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    merged = peft_model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        for batch, want in zip(batches, expected, strict=True):
            got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = batch["attention_mask"].bool()
            gap = (got[mask] - want[mask]).abs().max().item()
            if gap > atol:
                raise UserError(
                    f"LoRA merge refused: the merged model's logits differ from the adapter's by up to {gap:.2e} "
                    f"(tolerance {atol}), so nothing was written; train in float32, or keep the adapter unmerged "
                    "(merge: false)"
                )
    return merged
