"""Tasks are data: records plus a scoring rule [nc, lme].

A task is `generate` (greedy answer, exact match), `multiple_choice` (log-likelihood of each choice:
acc and acc_norm) or `perplexity` (rolling log-likelihood of texts). TASKS holds the built-in ones: one per
synthetic generator (scored on its fixed test split, k-shot examples from its train split) and `probe`,
the general text probe. A path to a .jsonl file is a user task; its kind comes from its keys:
{prompt, answer} generate, {prompt, choices, answer} multiple_choice, {text} perplexity. Its k-shot
examples come from a second file of the same shape, or else k records held out of the file itself (seeded,
and removed from the scored records, so a shot is never also a question); `columns` maps a file's own keys
onto these. A .yaml/.yml path is an lm-eval task YAML over local data (eval/lmeval_yaml.py): its records are
rendered and checked here too, and it carries its own prompts, shots, filters and metrics in `extra`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from lmforge.data import probe, synthetic
from lmforge.errors import UserError
from lmforge.eval import lmeval_yaml

KINDS = ("generate", "multiple_choice", "perplexity")
FEWSHOT_SEED = 1234  # lm-eval's default, so k-shot draws and held-out shots are fixed across runs and models
_SHAPES = {"generate": "{prompt, answer}", "multiple_choice": "{prompt, choices, answer}", "perplexity": "{text}"}


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
    shots_from: str = "train split"
    """Where the k-shot examples come from, as reported in results.json."""
    held_out: int = 0
    """Records of a user file held out as shots (and so not scored)."""


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


def get_task(
    name: str, num_fewshot: int = 0, fewshot_file: str | Path | None = None, columns: dict[str, str] | None = None
) -> Task:
    """A built-in task by name, a user task from a .jsonl file or an lm-eval task YAML, checked to have its shots.

    A user file's shots come from `fewshot_file` (records of the same shape) or, without one, from
    `num_fewshot` of its own records held out (seeded) and not scored; `columns` ({canonical: their key})
    renames a .jsonl file's keys. Built-in tasks use their train split. A task YAML takes its shots from its
    own splits and `num_fewshot` (0 here keeps the file's). Every check here runs before a model loads.
    """
    if columns and not name.endswith(".jsonl"):
        raise UserError(f"--columns maps the keys of .jsonl task files, not of task '{name}'")
    if lmeval_yaml.is_task_yaml(name):
        return _yaml_task(name, num_fewshot)
    if name in TASKS:
        task = TASKS[name]
    elif name.endswith(".jsonl"):
        task = _user_task(Path(name), num_fewshot, Path(fewshot_file) if fewshot_file else None, columns)
    else:
        raise UserError(
            f"unknown task '{name}': use one of {', '.join(TASKS)}, a .jsonl file or an lm-eval task .yaml of your own"
        )
    if task.kind != "perplexity" and num_fewshot > 0:
        available = len(task.shots()) if task.shots else 0
        if available < num_fewshot:
            raise UserError(
                f"task '{task.name}' has {available} k-shot examples ({task.shots_from}), fewer than -k "
                f"{num_fewshot}: lower -k"
            )
    return task


def _yaml_task(path: str, num_fewshot: int) -> Task:
    spec = lmeval_yaml.load_task(path, num_fewshot or None)
    return Task(
        name=spec.name,
        kind=lmeval_yaml.KIND[spec.output_type],
        description=f"lm-eval task YAML {path}",
        docs=lambda: spec.docs,
        version=str((spec.config.get("metadata") or {}).get("version", "1")),
        extra={"lmeval": spec, "num_fewshot": spec.num_fewshot, "output_type": spec.output_type},
        shots_from=f"split {spec.config['fewshot_split']} of {path}" if spec.num_fewshot else "none",
    )


def _user_task(path: Path, num_fewshot: int, fewshot_file: Path | None, columns: dict[str, str] | None = None) -> Task:
    kind, docs = _read_records(path, "task file", columns)
    if kind == "perplexity":  # rolling log-likelihood of whole texts takes no shots
        return Task(name=str(path), kind=kind, description=f"user task from {path}", docs=lambda: docs)
    shots: list[dict] = []
    held_out = 0
    if fewshot_file is not None:
        if fewshot_file.resolve() == path.resolve():
            raise UserError(
                f"fewshot file {fewshot_file} is the task file itself: leave out --fewshot-file to hold shots out of it"
            )
        shot_kind, shots = _read_records(fewshot_file, "fewshot file", columns)
        if shot_kind != kind:
            raise UserError(
                f"fewshot file {fewshot_file} holds {_SHAPES[shot_kind]} records but task {path} holds "
                f"{_SHAPES[kind]}: give shots of the task's shape"
            )
        shots_from = f"fewshot file {fewshot_file}"
    elif num_fewshot > 0:
        if num_fewshot >= len(docs):
            raise UserError(
                f"{path} has {len(docs)} records: -k {num_fewshot} would hold out {num_fewshot} as shots and leave "
                "none to score: lower -k or pass --fewshot-file FILE"
            )
        chosen = set(random.Random(FEWSHOT_SEED).sample(range(len(docs)), num_fewshot))
        shots = [doc for index, doc in enumerate(docs) if index in chosen]
        docs = [doc for index, doc in enumerate(docs) if index not in chosen]
        held_out = num_fewshot
        shots_from = f"{num_fewshot} records held out of {path}"
    else:
        shots_from = "none"
    return Task(
        name=str(path),
        kind=kind,
        description=f"user task from {path}",
        docs=lambda: docs,
        shots=lambda: shots,
        shots_from=shots_from,
        held_out=held_out,
    )


def _read_records(path: Path, role: str, columns: dict[str, str] | None = None) -> tuple[str, list[dict]]:
    """The kind and records of a task-shaped .jsonl file; `role` names it in errors, `columns` renames keys."""
    if not path.is_file():
        raise UserError(f"{role} not found: {path}: check the path")
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    records.append(_user_record(line, f"{path}:{number}", columns))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason}): save the file as UTF-8") from None
    if not records:
        raise UserError(f"{path} is empty: a {role} needs one JSON record per line")
    kinds = {kind for kind, _ in records}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes task kinds {sorted(kinds)}: keep one kind of record per file")
    return kinds.pop(), [record for _, record in records]


def _user_record(line: str, where: str, columns: dict[str, str] | None = None) -> tuple[str, dict]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    for canonical, theirs in (columns or {}).items():
        if canonical not in ("prompt", "answer", "choices", "text"):
            raise UserError(f"--columns {canonical}={theirs}: a task record's keys are prompt, answer, choices, text")
        if theirs not in row:
            raise UserError(f"{where}: missing key '{theirs}' (mapped by --columns {canonical}={theirs})")
        row[canonical] = row.pop(theirs)
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
