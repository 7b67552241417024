"""Router-only training of a freshly built mixture of experts (`train_router:` in the `lmforge moe` YAML).

Rows from prompts (moe_router.py) place each router once, from a few states; on the demo's two experts they
sent barely more than half of each task's tokens to its expert. This stage trains the `mlp.gate.weight` of
every layer for a few steps through the one training loop (train/loop.py), everything else frozen, and writes
the trained rows back over the staged output in place: every other tensor stays bit-identical to the untrained
build. The loss, summed over every real token and averaged over layers where it is per layer, is
  label_weight x cross-entropy(router logits, the expert whose text the token is in)   [supervised routing]
+ lm_weight x next-token loss of the MoE                                              [the issue's wording]
+ balance_weight x Switch Transformer's load balance, E x sum_i f_i P_i per layer      [arXiv 2101.03961 eq. 4]
Why all three: the language-model loss alone cannot move a top-1 router (Mixtral renormalises the chosen
experts' weights, so one expert always gets weight 1 and the router's gradient is zero but for float rounding,
about 1e-7 on the tiny test model), and on top-2-of-2 it only tunes the mixing weights; the token labels say
directly what routing accuracy measures.
The balance term keeps any expert from going unused (f_i: share of tokens with expert i in their top-k,
P_i: mean router probability), as transformers' `load_balancing_loss_func` computes it for one layer. It pulls
toward equal token shares, so where one task's texts are longer it slightly opposes the labels: its small
default weight (Switch's 0.01) keeps it a guard against a dead expert, not a target.
Data: the routing tasks' train splits (never their test records, which routing accuracy reads), or else
each expert's positive prompts, every token labelled with its expert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from lmforge import config as config_io
from lmforge.data import synthetic
from lmforge.data.chat import IGNORE_INDEX, chat_prompt
from lmforge.errors import UserError
from lmforge.merge.safetensors_io import OutputTensor, index_folder, write_at
from lmforge.train.chunked import chunked_cross_entropy, on_model_device

if TYPE_CHECKING:
    from lmforge.merge.moe import MoEConfig

# Rows scored before and after training for run.json: an evenly spaced sample. All 400 default texts would
# be two more full forward passes of the MoE, where training itself reads 50 steps x 8 = 400 rows once.
SCORED_ROWS = 64
ROUTER_SUFFIX = ".mlp.gate.weight"  # Mixtral's and Qwen2-MoE's router (not Qwen's shared_expert_gate)


@dataclass(frozen=True)
class RouterTraining:
    """lmforge only (`train_router:` in the MoE YAML): train the routers for a few steps after the build."""

    steps: int = 50
    """Optimiser steps."""
    lr: float = 1e-3
    """AdamW learning rate, constant (no warmup, no decay)."""
    batch_size: int = 8
    """Texts per step."""
    data: Literal["tasks", "prompts"] | None = None
    """tasks: the routing_tasks' train splits (built-in tasks); prompts: each expert's positive_prompts.
    Default: tasks when routing_tasks is set, else prompts."""
    records_per_expert: int = 200
    """With data: tasks, train records taken from each task."""
    max_length: int = 256
    """Longer texts are cut to this many tokens."""
    label_weight: float = 1.0
    """Weight of the routing cross-entropy (each token's label: its text's expert)."""
    lm_weight: float = 1.0
    """Weight of the MoE's next-token loss (moves the routers only when experts_per_token > 1)."""
    balance_weight: float = 0.01
    """Weight of the Switch Transformer load-balancing loss (Switch uses 0.01, Mixtral's config 0.02)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "records_per_expert", "max_length"):
            config_io.at_least(self, name, 1)
        config_io.above(self, "lr", 0)
        for name in ("label_weight", "lm_weight", "balance_weight"):
            config_io.at_least(self, name, 0)
        config_io.require(
            self.label_weight + self.lm_weight + self.balance_weight > 0,
            "label_weight",
            "lm_weight and balance_weight are all 0: nothing to train; set at least one above 0",
        )


def source_of(cfg: MoEConfig, settings: RouterTraining) -> str:
    return settings.data or ("tasks" if cfg.routing_tasks else "prompts")


def check(cfg: MoEConfig, where: str) -> None:
    """Refuse, before anything loads, a router training that cannot get data or a gradient; one line each."""
    settings = cfg.train_router
    if settings is None:
        return
    if source_of(cfg, settings) == "tasks":
        if not cfg.routing_tasks:
            raise UserError(f"{where}: train_router.data: tasks needs routing_tasks (one per expert): add them")
        for task in cfg.routing_tasks:
            if task not in synthetic.GENERATORS:
                raise UserError(
                    f"{where}: train_router.data: tasks trains on built-in tasks' train splits and '{task}' is "
                    f"not one ({', '.join(synthetic.GENERATORS)}): use train_router.data: prompts"
                )
    else:
        for i, expert in enumerate(cfg.experts):
            if not expert.positive_prompts:
                raise UserError(
                    f"{where}: train_router.data: prompts needs positive_prompts on every expert and experts[{i}] "
                    f"({expert.source_model}) has none: add some, or set routing_tasks and data: tasks"
                )
    if cfg.experts_per_token == 1 and settings.label_weight == 0 and settings.balance_weight == 0:
        raise UserError(
            f"{where}: train_router: with experts_per_token 1 the language-model loss gives the routers no "
            "gradient (the chosen expert's weight is always 1): set label_weight or balance_weight above 0"
        )


def training_texts(cfg: MoEConfig, settings: RouterTraining, tokenizer) -> list[tuple[str, int]]:
    """(text, expert index) pairs: task train records rendered as evaluation renders them, or positive prompts."""
    if source_of(cfg, settings) == "prompts":
        return [(p, i) for i, e in enumerate(cfg.experts) for p in e.positive_prompts or []]
    texts = []
    for i, task in enumerate(cfg.routing_tasks or []):
        for record in synthetic.examples(task, "train", settings.records_per_expert):
            texts.append((chat_prompt(tokenizer, record["prompt"]) + str(record["answer"]), i))
    return texts


def make_rows(texts: Sequence[tuple[str, int]], tokenizer, max_length: int) -> list[dict]:
    """Token rows for the loop, tokenised as routing accuracy tokenises (moe_eval.expert_shares)."""
    rows = []
    for text, expert in texts:
        ids = tokenizer(text)["input_ids"][:max_length]
        rows.append({"input_ids": ids, "expert": expert})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask [batch, width], experts [batch], and num_items: the real
    tokens, which every loss term is summed over (the loop divides by the step's total)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    experts = torch.tensor([r["expert"] for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "experts": experts, "num_items": int(mask.sum())}


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of one layer's router: E x sum_i f_i P_i.

    Args:
        logits: [tokens, E] router logits of real tokens.
        top_k: experts per token; f_i counts the tokens with expert i among their top-k (sum of f is top_k).
    Returns:
        Scalar; 1 x top_k when tokens and probabilities are spread evenly. Only P_i carries a gradient.
    """
    probs = logits.float().softmax(dim=-1)  # [tokens, E]
    count = probs.shape[-1]
    chosen = probs.topk(top_k, dim=-1).indices  # [tokens, k]
    share = F.one_hot(chosen, count).sum(dim=1).float().mean(dim=0)  # f: [E]
    return count * (share * probs.mean(dim=0)).sum()


def router_loss(model, batch: dict, settings: RouterTraining, top_k: int) -> tuple[torch.Tensor, dict]:
    """The loop's loss_fn: the weighted sum (module docstring) over the batch's real tokens, and each term."""
    batch = on_model_device(model, batch)
    mask = batch["attention_mask"]
    out = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, output_router_logits=True
    )
    keep = mask.reshape(-1).bool()
    tokens = keep.sum()
    labels = batch["experts"][:, None].expand_as(mask).reshape(-1)[keep]  # [tokens]
    layers = [logits[keep].float() for logits in out.router_logits]  # per layer [tokens, E]
    terms = {
        "label": torch.stack([F.cross_entropy(x, labels, reduction="sum") for x in layers]).mean(),
        "balance": torch.stack([balance_loss(x, top_k) for x in layers]).mean() * tokens,
    }
    if settings.lm_weight:
        head = model.get_output_embeddings()
        targets = batch["input_ids"].masked_fill(mask == 0, IGNORE_INDEX)
        terms["lm"], _ = chunked_cross_entropy(
            out.last_hidden_state, head.weight, targets, head_bias=getattr(head, "bias", None)
        )
    weights = {"label": settings.label_weight, "balance": settings.balance_weight, "lm": settings.lm_weight}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}


def scored_sample(rows: list[dict]) -> list[dict]:
    """At most SCORED_ROWS rows, evenly spaced: the texts come grouped by expert, so a prefix would be one expert's."""
    count = min(SCORED_ROWS, len(rows))
    return [rows[i * len(rows) // count] for i in range(count)]


@torch.no_grad()
def mean_terms(model, rows: list[dict], settings: RouterTraining, top_k: int, pad_id: int) -> dict[str, float]:
    """Each loss term per real token over `rows` (before and after training, for run.json)."""
    sums: dict[str, float] = {}
    tokens = 0
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), settings.batch_size):
        batch = collate(rows[start : start + settings.batch_size], pad_id)
        _, terms = router_loss(model, batch, settings, top_k)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        tokens += batch["num_items"]
    model.train(was_training)
    return {name: round(value / tokens, 5) for name, value in sums.items()}


def train_routers(folder: Path, cfg: MoEConfig, work_dir: Path, seed: int = 0, device: str = "cpu") -> dict:
    """Train the routers of the MoE staged in `folder` and write them back in place; returns run.json's record.

    Args:
        folder: the staged MoE (weights, config.json, tokenizer), rewritten in place (router tensors only).
        cfg: the MoE config; cfg.train_router holds the settings.
        work_dir: the loop's work folder (its log.jsonl goes into the output).
        seed: seeds the data order.
        device: where the model is loaded (the loop's accelerator places it).
    """
    from lmforge.models.load import load_model
    from lmforge.train.loop import TrainConfig, train  # Accelerate loads only when routers are trained
    from lmforge.train.progress import print_progress

    settings = cfg.train_router
    assert settings is not None, "train_routers needs cfg.train_router"
    loaded = load_model(folder, dtype="float32", device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.requires_grad_(False)
    routers = {name: p for name, p in model.named_parameters() if name.endswith(ROUTER_SUFFIX)}
    if len(routers) != int(model.config.num_hidden_layers):
        raise AssertionError(f"expected one router per layer, found {sorted(routers)}")
    for param in routers.values():
        param.requires_grad_(True)
    rows = make_rows(training_texts(cfg, settings, tokenizer), tokenizer, settings.max_length)
    top_k = int(model.config.num_experts_per_tok)
    scored = scored_sample(rows)
    before = mean_terms(model, scored, settings, top_k, pad_id)
    loop = TrainConfig(
        lr=settings.lr,
        max_steps=settings.steps,
        batch_size=settings.batch_size,
        schedule="constant",
        max_grad_norm=1.0,
        save_every=settings.steps,
        seed=seed,
    )
    history = train(
        model,
        rows,
        lambda m, b: router_loss(m, b, settings, top_k),
        lambda b: collate(b, pad_id),
        loop,
        work_dir,
        on_log=print_progress(settings.steps),
    )
    after = mean_terms(model, scored, settings, top_k, pad_id)
    write_routers(folder, {name: p.detach().cpu() for name, p in routers.items()})
    losses = [round(h["loss"], 5) for h in history if "loss" in h]
    return {
        "settings": config_io.to_dict(settings),
        "data": source_of(cfg, settings),
        "texts": len(rows),
        "terms_scored_on": len(scored),
        "steps": len(losses),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "terms_before": before,
        "terms_after": after,
        "trained": sorted(routers),
    }


def write_routers(folder: Path, trained: dict[str, torch.Tensor]) -> None:
    """Overwrite each router tensor's bytes in the staged safetensors, in its stored dtype; nothing else moves."""
    index = index_folder(folder)
    for name, tensor in trained.items():
        info = index[name]
        if tuple(tensor.shape) != info.shape:
            raise AssertionError(f"{name}: stored {info.shape}, trained {tuple(tensor.shape)}")
        write_at(OutputTensor(info.file, info.start, info.end - info.start), tensor.to(info.dtype).contiguous())
