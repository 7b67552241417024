"""Weight search: task arithmetic with the per-model weights that score best on held-out tasks.

Task arithmetic's scaling is chosen on validation data in the paper that introduced it (Ilharco et al. 2023,
https://arxiv.org/abs/2212.04089); mergekit leaves that search to the user (or to mergekit-evolve's
CMA-ES). Here every combination of the given weights (one per model, from `parameters.weights`) is tried:
base + sum_i w_i (model_i - base) is loaded into one model instance (every input's tensor names and shapes
checked against it first, as the greedy soup does) and scored by the evaluation harness on
each held-out task. The best combination by `rule` (min: the weakest task counts, for a merge meant to do
every task; mean: the average) becomes a mergekit `task_arithmetic` config that the streaming engine writes.
Ties go to the earlier combination in the grid's order. Cost: one evaluation per combination.
"""

from __future__ import annotations

import itertools
import logging

from lmforge.errors import UserError
from lmforge.merge.config import MergeConfig
from lmforge.merge.plan import InputModel
from lmforge.merge.soup import CARRIED_KEYS, LOWER_IS_BETTER, float_weights, score_task
from lmforge.models.load import load_model

log = logging.getLogger("lmforge.merge")
MAX_COMBINATIONS = 64  # each costs a full evaluation; a larger grid is a mistake, not a plan


def choose(cfg: MergeConfig, models: list[InputModel], limit_default: int = 50) -> tuple[dict, list[dict]]:
    """Score every weight combination; returns (task_arithmetic config of the best, one log row per combination)."""
    tasks, grid, limit, metric, rule = _settings(cfg, limit_default)
    by_ref = {m.ref: m for m in models}
    base, experts = by_ref[cfg.base_model], [by_ref[s.model] for s in cfg.models]
    combinations = list(itertools.product(grid, repeat=len(experts)))
    if len(combinations) > MAX_COMBINATIONS:
        raise UserError(
            f"{cfg.where}: weight_search would score {len(combinations)} combinations ({len(grid)} weights ^ "
            f"{len(experts)} models); give at most {MAX_COMBINATIONS} (fewer weights or models)"
        )
    loaded = load_model(base.folder)
    base_weights = float_weights(base, loaded.model, "weight search base")
    deltas = []
    for expert in experts:
        weights = float_weights(expert, loaded.model, "weight search model")
        deltas.append({name: weights[name] - base_weights[name] for name in base_weights})
        del weights
    rows, best, best_value = [], None, None
    for combination in combinations:
        trial = {name: value.clone() for name, value in base_weights.items()}
        for weight, delta in zip(combination, deltas, strict=True):
            for name in trial:
                trial[name].add_(delta[name], alpha=weight)
        loaded.model.load_state_dict(trial, strict=False)  # names and shapes checked by float_weights
        del trial
        scores = {}
        for task in tasks:
            scores[task], metric = score_task(loaded, task, limit, metric)
        value = _combine(list(scores.values()), rule, metric)
        log.info("weight search: weights %s -> %s %s %.4f", list(combination), rule, metric, value)
        rows.append({"weights": list(combination), "scores": scores, "value": value})
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
        if best_value is None or sign * value > sign * best_value:
            best, best_value = len(rows) - 1, value
    for number, row in enumerate(rows):
        row["chosen"] = number == best
    return task_arithmetic(cfg, [s.model for s in cfg.models], rows[best]["weights"]), rows


def _settings(cfg: MergeConfig, limit_default: int) -> tuple[list[str], list[float], int, str, str]:
    p = cfg.parameters
    tasks = p.get("task")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not tasks or not all(isinstance(t, str) for t in tasks):
        raise UserError(f"{cfg.where}: weight_search needs parameters.task: one held-out task or a list of them")
    grid = p.get("weights", [0.5, 1.0])
    grid = [grid] if isinstance(grid, int | float) else grid
    if not grid or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in grid):
        raise UserError(f"{cfg.where}: parameters.weights must be a list of numbers (the weights tried per model)")
    rule = p.get("rule", "min")
    if rule not in ("min", "mean"):
        raise UserError(f"{cfg.where}: parameters.rule must be min (the weakest task counts) or mean, got {rule!r}")
    if not cfg.base_model or not cfg.models:
        raise UserError(f"{cfg.where}: weight_search needs a base_model and the fine-tunes of it under 'models'")
    return tasks, [float(w) for w in grid], p.get("limit", limit_default), p.get("metric", ""), rule


def _combine(values: list[float], rule: str, metric: str) -> float:
    if rule == "mean":
        return sum(values) / len(values)
    return max(values) if metric in LOWER_IS_BETTER else min(values)  # the weakest task


def task_arithmetic(cfg: MergeConfig, refs: list[str], weights: list[float]) -> dict:
    """The mergekit config of base + sum of weight x task vector, keeping cfg's dtype and tokenizer settings."""
    models = [{"model": ref, "parameters": {"weight": w}} for ref, w in zip(refs, weights, strict=True)]
    config = {"merge_method": "task_arithmetic", "base_model": cfg.base_model, "models": models}
    return config | {k: cfg.raw[k] for k in CARRIED_KEYS if cfg.raw.get(k) is not None}


def card_lines(rows: list[dict]) -> list[str]:
    """The model card's table of the search: every combination and its held-out scores."""
    tasks = list(rows[0]["scores"]) if rows else []
    lines = ["", "Weight search (task arithmetic; every combination scored on held-out tasks):", ""]
    lines += ["| weights | " + " | ".join(tasks) + " | value | chosen |", "|---|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        cells = " | ".join(f"{r['scores'][t]:.4f}" for t in tasks)
        weights = ", ".join(f"{w:g}" for w in r["weights"])
        lines.append(f"| {weights} | {cells} | {r['value']:.4f} | {'yes' if r['chosen'] else ''} |")
    return lines
