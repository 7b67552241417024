"""Greedy soup (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482): add a model only if it helps.

Every candidate is scored on a held-out task by the evaluation harness; then, best first, each is tried in
the uniform average of the models kept so far and kept only if the soup's score strictly improves. The
running sum of the kept weights stays in memory (float32) and each trial soup is loaded into one model
instance, so the search costs one model load per candidate plus one evaluation per trial. The chosen
soup is returned as a mergekit `linear` config that the streaming engine then writes like any merge.
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


def score_task(loaded, task: str, limit: int, metric: str) -> tuple[float, str]:
    """(value, metric name) of a loaded model on one task; the task's first metric when `metric` is empty."""
    results = metrics_of(evaluate(loaded, [task], limit=limit, footprint=False))[task]
    name = metric or next(iter(results))
    if name not in results:
        raise UserError(f"task {task} has no metric '{name}': use one of {', '.join(results)}")
    return results[name]["value"], name


def float_weights(model: InputModel) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of an input model, in float32 (what a trial merge adds up)."""
    return {name: read_rows(info).float() for name, info in model.index.items() if info.dtype.is_floating_point}


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
        value, metric = score_task(load_model(model.folder), task, limit, metric)
        log.info("greedy soup: %s scores %s %.4f", model.ref, metric, value)
        scores.append(value)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    order = sorted(range(len(candidates)), key=lambda i: -sign * scores[i])
    best = order[0]
    rows = [{"model": candidates[best].ref, "score": scores[best], "soup_score": scores[best], "kept": True}]
    loaded = load_model(candidates[best].folder)
    total, kept, best_score = float_weights(candidates[best]), [best], scores[best]
    for i in order[1:]:
        weights = float_weights(candidates[i])
        trial = {name: (total[name] + weights[name]) / (len(kept) + 1) for name in total}
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
