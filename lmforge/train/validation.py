"""The validation every trainer runs inside the loop: a loss averaged over units, not over batches.

One function serves SFT (units: labelled tokens), distillation (tokens) and DPO (units: preference pairs,
with its reward metrics): the summed loss of every batch over the summed units, so a short last batch
weighs what it holds. Batches are built on the CPU and moved to the model's device here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lmforge.train.chunked import on_model_device


def validation(
    rows: list[dict],
    collate: Callable[[list[dict]], dict],
    loss_fn: Callable,
    batch_size: int = 8,
    units: str = "tokens",
    name: str = "val_loss",
    means: Sequence[str] = (),
) -> Callable[[torch.nn.Module], dict]:
    """An evaluate function for the loop: `name` = summed loss / summed units over `rows`.

    Args:
        rows: validation rows; `collate` turns a list of them into a batch.
        loss_fn: (model, batch) -> (loss summed over the batch, metrics holding `units` and `means`).
        units: the metric that counts what the loss is summed over ("tokens", "pairs").
        means: metrics that are per-unit means within a batch; they are averaged over all units too.
    Returns:
        model -> {name: mean loss, **{metric: mean}}.
    """

    def score(model: torch.nn.Module) -> dict:
        total, count, sums = 0.0, 0, dict.fromkeys(means, 0.0)
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                loss, metrics = loss_fn(model, on_model_device(model, collate(rows[start : start + batch_size])))
                total, count = total + loss.item(), count + int(metrics[units])
                for key in means:
                    sums[key] += metrics[key] * metrics[units]
        return {name: total / max(count, 1)} | {key: value / max(count, 1) for key, value in sums.items()}

    return score
