"""The forgetting report of a training command: the same tasks scored before and after training.

`EvalSettings` is the `eval:` section of finetune, dpo and distill. The tasks are the target task (eval.task,
else the data's built-in task) and the general text probe; `forgetting_rows` pairs each task's headline
metrics before and after, for the terminal and the model card.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lmforge import config as config_io
from lmforge.eval.lmeval_yaml import is_task_yaml, load_task
from lmforge.eval.run import evaluate, metrics_of
from lmforge.eval.tasks import TASKS
from lmforge.models.load import LoadedModel
from lmforge.outputs import CardTable

log = logging.getLogger("lmforge.eval")
REPORTED = ("exact_match", "acc", "perplexity")


@dataclass(frozen=True)
class EvalSettings:
    """What is scored before and after training (the forgetting report)."""

    task: str | None = None
    """Task scored on base and result (built-in, .jsonl or lm-eval task .yaml); defaults to data.task."""
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
        known = self.task is None or self.task in TASKS or self.task.endswith((".jsonl", ".yaml", ".yml"))
        config_io.require(
            known, "task", f"is not a task: use one of {', '.join(TASKS)}, a .jsonl file or an lm-eval task .yaml"
        )
        if self.task and is_task_yaml(self.task):  # read and rendered now, so a bad task fails before training
            load_task(self.task)


def report_tasks(settings: EvalSettings, data_task: str | None = None) -> list[str]:
    """The tasks scored before and after: the target task (if any) and the probe (unless turned off)."""
    return [t for t in [settings.task or data_task] if t] + (["probe"] if settings.probe else [])


def score(loaded: LoadedModel, tasks: list[str], settings: EvalSettings) -> dict | None:
    """`evaluate` on the report's tasks, without the footprint (None when there is nothing to score)."""
    if not tasks:
        return None
    return evaluate(loaded, tasks, limit=settings.limit, batch_size=settings.batch_size, footprint=False)


def forgetting_rows(before: dict | None, after: dict | None) -> list[tuple[str, str, float, float]]:
    """(task, metric, value before, value after) for each reported metric scored both times."""
    if not before or not after:
        return []
    rows = []
    for task, metrics in metrics_of(before).items():
        for metric, cell in metrics.items():
            if metric in REPORTED:
                rows.append((task, metric, cell["value"], metrics_of(after)[task][metric]["value"]))
    return rows


def print_forgetting(before: dict | None, after: dict | None, trained: str = "fine-tuned") -> None:
    """One log line per reported metric: base -> trained, with the change."""
    for task, metric, base, result in forgetting_rows(before, after):
        log.info("%s %s: base %.4f -> %s %.4f (%+.4f)", task, metric, base, trained, result, result - base)


def forgetting_table(before: dict | None, after: dict | None, trained: str = "fine-tuned") -> CardTable:
    """The model card's table of the report: base, trained and the change, per task and metric."""
    rows = [[t, m, f"{b:.4f}", f"{r:.4f}", f"{r - b:+.4f}"] for t, m, b, r in forgetting_rows(before, after)]
    return CardTable(["task", "metric", "base", trained, "delta"], rows)
