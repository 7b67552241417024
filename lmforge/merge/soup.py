"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482): add a model only if it helps.

Every candidate is scored on a held-out task by the evaluation harness; then, best first, each is tried in
the uniform average of the models kept so far and kept only if the soup's score strictly improves. The
running sum of the kept weights stays in memory (float32) and each trial soup is loaded into one model
instance, so the search costs one model load per candidate plus one evaluation per trial. Every
ingredient's tensor names and shapes are checked against that model before a trial is loaded: a name the
model lacks would otherwise be skipped, and the trial would score the previous weights. The chosen soup is
returned as a mergekit `linear` config that the streaming engine then writes like any merge.
"""

from __future__ import annotations

import logging

import torch

from lmforge.errors import UserError
from lmforge.eval.run import evaluate, metrics_of
from lmforge.merge.config import MergeConfig
from lmforge.merge.plan import InputModel
from lmforge.merge.safetensors_io import read_rows
from lmforge.models.load import load_model

log = logging.getLogger("lmforge.merge")
LOWER_IS_BETTER = ("perplexity", "byte_perplexity", "bits_per_byte")
CARRIED_KEYS = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
ROLE = "greedy soup ingredient"


def score_task(loaded, task: str, limit: int, metric: str) -> tuple[float, str]:
    """(value, metric name) of a loaded model on one task; the task's first metric when `metric` is empty."""
    results = metrics_of(evaluate(loaded, [task], limit=limit, footprint=False))[task]
    name = metric or next(iter(results))
    if name not in results:
        raise UserError(f"task {task} has no metric '{name}': use one of {', '.join(results)}")
    return results[name]["value"], name


def trial_names(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """name -> shape of the tensors a trial must supply: the model's floating-point state, less tied copies
    (an output embedding that shares the input embedding's storage is loaded through the first name)."""
    seen, names = set(), {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.data_ptr() not in seen:
            names[name] = tuple(tensor.shape)
        seen.add(tensor.data_ptr())
    return names


def check_fits(ingredient: InputModel, model: torch.nn.Module, role: str) -> dict[str, tuple[int, ...]]:
    """Check that `model` can load every floating-point tensor of `ingredient`; returns trial_names(model).

    Args:
        ingredient: an input model whose weights trials add up.
        model: the loaded model the trials are loaded into (load_state_dict copies by name).
        role: what the ingredient is, for the error ("greedy soup ingredient", "weight search base").
    Raises:
        UserError naming the ingredient, the first tensor the model has no parameter for or expects in
        another shape (with its file), or the first tensor the model needs that the ingredient lacks.
    """
    state, kind = model.state_dict(), type(model).__name__
    for name, info in ingredient.index.items():
        if not info.dtype.is_floating_point:
            continue
        if name not in state:
            raise UserError(
                f"{role} {ingredient.ref}: tensor {name} in {info.file} is not a parameter of the {kind} that "
                "the trials load into: the checkpoint's names differ from the model's; re-save it with save_pretrained"
            )
        if tuple(info.shape) != tuple(state[name].shape):
            raise UserError(
                f"{role} {ingredient.ref}: tensor {name} in {info.file} has shape {list(info.shape)} but the "
                f"{kind} that the trials load into expects {list(state[name].shape)}: merge models of one shape"
            )
    names = trial_names(model)
    for name in names:
        if name not in ingredient.index:
            raise UserError(
                f"{role} {ingredient.ref}: missing tensor {name} that {kind} needs (no safetensors file in "
                f"{ingredient.folder} holds it): re-save the model with save_pretrained"
            )
    return names


def float_weights(ingredient: InputModel, model: torch.nn.Module, role: str) -> dict[str, torch.Tensor]:
    """The float32 tensors of `ingredient` that a trial loaded into `model` needs, checked by check_fits."""
    return {name: read_rows(ingredient.index[name]).float() for name in check_fits(ingredient, model, role)}


def choose(cfg: MergeConfig, models: list[InputModel], limit_default: int = 50) -> tuple[dict, list[dict]]:
    """Run the greedy search; returns (linear mergekit config of the kept models, one log row per candidate)."""
    task, limit, metric = (
        cfg.parameters.get("task"),
        cfg.parameters.get("limit", limit_default),
        cfg.parameters.get("metric", ""),
    )
    if not isinstance(task, str):
        raise UserError(f"{cfg.where}: greedy_soup needs parameters.task: the held-out task that scores the soup")
    by_ref = {m.ref: m for m in models}
    candidates = [by_ref[s.model] for s in cfg.models]
    scores = []
    for model in candidates:
        alone = load_model(model.folder)
        check_fits(model, alone.model, ROLE)  # a mismatch stops before any evaluation
        value, metric = score_task(alone, task, limit, metric)
        log.info("greedy soup: %s scores %s %.4f", model.ref, metric, value)
        scores.append(value)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    order = sorted(range(len(candidates)), key=lambda i: -sign * scores[i])
    best = order[0]
    rows = [{"model": candidates[best].ref, "score": scores[best], "soup_score": scores[best], "kept": True}]
    loaded = load_model(candidates[best].folder)
    total, kept, best_score = float_weights(candidates[best], loaded.model, ROLE), [best], scores[best]
    for i in order[1:]:
        weights = float_weights(candidates[i], loaded.model, ROLE)
        trial = {name: (total[name] + weights[name]) / (len(kept) + 1) for name in total}
        # strict=False only for what trial_names leaves out (tied copies, integer buffers): float_weights
        # checked that every floating-point tensor of the model is in the trial, under its own name and shape
        loaded.model.load_state_dict(trial, strict=False)
        value, _ = score_task(loaded, task, limit, metric)
        better = sign * value > sign * best_score
        log.info("greedy soup: + %s -> %s %.4f (%s)", candidates[i].ref, metric, value, "kept" if better else "dropped")
        rows.append({"model": candidates[i].ref, "score": scores[i], "soup_score": value, "kept": better})
        if better:
            for name in total:
                total[name] += weights[name]
            kept.append(i)
            best_score = value
        del weights, trial
    return uniform(cfg, [candidates[i].ref for i in kept]), rows


def uniform(cfg: MergeConfig, refs: list[str]) -> dict:
    """The mergekit config of the uniform average of `refs`, keeping cfg's dtype and tokenizer settings."""
    if not cfg.models or cfg.base_model:
        raise UserError(f"{cfg.where}: greedy_soup takes its candidates under 'models' and no base_model")
    linear = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in refs]}
    return linear | {k: cfg.raw[k] for k in CARRIED_KEYS if cfg.raw.get(k) is not None}
