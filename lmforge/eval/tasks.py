"""Tasks are data: records plus a scoring rule [nc, lme].

A task is `generate` (greedy answer, exact match), `multiple_choice` (log-likelihood of each choice:
acc and acc_norm) or `perplexity` (rolling log-likelihood of texts). TASKS holds the built-in ones: one per
synthetic generator (scored on its fixed test split, k-shot examples from its train split) and `probe`,
the general text probe. A path to a .jsonl file is a user task; its kind comes from its keys:
{prompt, answer} generate, {prompt, choices, answer} multiple_choice, {text} perplexity.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lmforge.data import probe, synthetic
from lmforge.errors import UserError

KINDS = ("generate", "multiple_choice", "perplexity")


@dataclass(frozen=True)
class Task:
    """A named set of scored records with the rule that scores them."""

    name: str
    kind: str
    description: str
    docs: Callable[[], list[dict]]
    """Scored records: {prompt, answer} | {prompt, choices, answer(index)} | {text}."""
    shots: Callable[[], list[dict]] | None = None
    """Source of k-shot examples (never the scored records)."""
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    version: str = "1"
    extra: dict = field(default_factory=dict)


def _synthetic_task(name: str) -> Task:
    generator = synthetic.GENERATORS[name]
    return Task(
        name=name,
        kind="generate",
        description=generator.skill,
        docs=partial(synthetic.examples, name, "test"),
        shots=partial(synthetic.examples, name, "train"),
    )


TASKS: dict[str, Task] = {name: _synthetic_task(name) for name in synthetic.GENERATORS} | {
    "probe": Task(
        name="probe",
        kind="perplexity",
        description="perplexity on the Python reference manual's prose (general English, forgetting check)",
        docs=lambda: [{"text": text} for text in probe.general_text()],
        version=probe.probe_version(),
    )
}


def get_task(name: str) -> Task:
    """A built-in task by name, or a user task from a .jsonl file."""
    if name in TASKS:
        return TASKS[name]
    if name.endswith(".jsonl"):
        return _user_task(Path(name))
    raise UserError(f"unknown task '{name}': use one of {', '.join(TASKS)}, or a .jsonl file of your own")


def _user_task(path: Path) -> Task:
    if not path.is_file():
        raise UserError(f"task file not found: {path}: check the path")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                records.append(_user_record(line, f"{path}:{number}"))
    if not records:
        raise UserError(f"{path} is empty: a task file needs one JSON record per line")
    kinds = {kind for kind, _ in records}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes task kinds {sorted(kinds)}: keep one kind of record per file")
    docs = [record for _, record in records]
    return Task(name=str(path), kind=kinds.pop(), description=f"user task from {path}", docs=lambda: docs)


def _user_record(line: str, where: str) -> tuple[str, dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "choices" in row:
        for key in ("prompt", "answer"):
            if key not in row:
                raise UserError(
                    f"{where}: multiple-choice record is missing key '{key}' (needs prompt, choices, answer)"
                )
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise UserError(f"{where}: key 'choices' must be a list of at least two strings")
        answer = row["answer"]
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UserError(f"{where}: key 'answer' must be a choice index (0..{len(choices) - 1}) or a choice string")
        return "multiple_choice", {"prompt": str(row["prompt"]), "choices": choices, "answer": answer}
    if "text" in row:
        return "perplexity", {"text": str(row["text"])}
    for key in ("prompt", "answer"):
        if key not in row:
            raise UserError(
                f"{where}: missing key '{key}': a task record is {{prompt, answer}}, "
                "{prompt, choices, answer} or {text}"
            )
    return "generate", {"prompt": str(row["prompt"]), "answer": str(row["answer"])}
