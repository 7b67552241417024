"""The `select` step: pick the model of the best eval run among candidates, so a recipe can say "distill
the best merge" without knowing in advance which merge that is.

Candidates are ranked by the headline metric of each named task (higher is better), by their mean or by
their worst task; the first candidate wins a tie. The choice and every candidate's score go to run.json.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import UserError
from lmforge.outputs import staged_output
from lmforge.report.compare import LOWER_IS_BETTER, read_record, task_scores
from lmforge.report.record import RunMeter, run_record, write_json


def select_best(candidates: list[str], tasks: list[str], rule: str, out: str | Path, overwrite: bool = False) -> Path:
    """The model folder of the best eval run among `candidates` (mean or worst headline score over `tasks`).

    Writes `out/run.json` recording every candidate's score and the choice; returns the chosen model folder.
    """
    meter = RunMeter()
    scores = {}
    for spec in candidates:
        record = read_record(Path(spec))
        row = task_scores(record.get("metrics"))
        values = []
        for task in tasks:
            if task not in row:
                raise UserError(f"{spec} has no score for task '{task}': evaluate it on {', '.join(tasks)}")
            if row[task]["metric"] in LOWER_IS_BETTER:
                raise UserError(f"select ranks by higher-is-better scores: drop '{task}' from its tasks")
            values.append(row[task]["value"])
        folder = record.get("inputs", {}).get("model", {}).get("folder")
        scores[folder] = sum(values) / len(values) if rule == "mean" else min(values)
    chosen = max(scores, key=scores.get)  # the first candidate wins a tie
    with staged_output(out, overwrite=overwrite) as staging:
        record = run_record("select", rule, meter, inputs={"candidates": candidates}, config={"tasks": tasks})
        record["chosen"], record["scores"] = chosen, scores
        write_json(staging / "run.json", record)
    return Path(chosen)
