"""A whole recipe on tiny models with the real step kinds, the demo's shape in miniature: two fine-tuned
experts, a merge and a greedy soup, a selection, a distilled student, evaluations and the report (which also
takes a fine-tuning run folder without an eval run).

Steps run in this process (isolate=False) to stay fast; test_recipe.py covers the child-process path.
"""

from __future__ import annotations

import io
import json

import pytest
import yaml
from rich.console import Console

from lmforge import config as config_io
from lmforge.models.tiny import make_tiny_llama
from lmforge.recipe.demo import available_steps, demo_recipe
from lmforge.recipe.kinds import KINDS, Kind
from lmforge.recipe.runner import run_recipe
from lmforge.recipe.schema import Recipe, load_recipe

TASKS = ["dates", "extraction"]


def expert(model, task: str) -> dict:
    return {
        "model": str(model),
        "merge": True,
        "data": {"task": task, "limit": 32},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-3, "save_every": 100},
        "eval": {"limit": 1, "batch_size": 2, "probe": False},
    }


def evaluation(step: str) -> dict:
    return {"model": f"${{steps.{step}.output}}", "tasks": [*TASKS, "probe"], "limit": 2, "footprint": False}


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    base = make_tiny_llama(tmp_path_factory.mktemp("base4"), layers=4, seed=0)
    folder = tmp_path_factory.mktemp("recipe")
    steps = [
        {"name": "base", "kind": "eval", "config": {**evaluation("x"), "model": str(base)}},
        {"name": "a", "kind": "finetune", "config": expert(base, "dates")},
        {"name": "b", "kind": "finetune", "config": expert(base, "extraction")},
        {
            "name": "ties",
            "kind": "merge",
            "config": {
                "merge_method": "ties",
                "base_model": str(base),
                "models": [
                    {"model": "${steps.a.output}", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "${steps.b.output}", "parameters": {"weight": 1.0, "density": 0.5}},
                ],
            },
        },
        {"name": "held", "kind": "data", "config": {"tasks": TASKS, "start": 100, "count": 2}},
        {
            "name": "soup",
            "kind": "merge",
            "config": {
                "merge_method": "greedy_soup",
                "models": [{"model": "${steps.a.output}"}, {"model": "${steps.b.output}"}],
                "parameters": {"task": "${steps.held.output}/task.jsonl", "limit": 2},
            },
        },
        {"name": "eval_ties", "kind": "eval", "config": evaluation("ties")},
        {"name": "eval_soup", "kind": "eval", "config": evaluation("soup")},
        {
            "name": "best",
            "kind": "select",
            "config": {"candidates": ["${steps.eval_ties.output}", "${steps.eval_soup.output}"], "tasks": TASKS},
        },
        {"name": "mix", "kind": "data", "config": {"tasks": TASKS, "count": 16}},
        {
            "name": "student",
            "kind": "distill",
            "config": {
                "teacher": "${steps.best.output}",
                "student_layers": 2,
                "data": {"path": "${steps.mix.output}/train.jsonl"},
                "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-3, "save_every": 100},
                "eval": {"task": "dates", "limit": 2, "batch_size": 2, "probe": False},
            },
        },
        {"name": "eval_student", "kind": "eval", "config": evaluation("student")},
        {
            "name": "report",
            "kind": "compare",
            "config": {
                "baseline": "base",
                "runs": [
                    "base=${steps.base.output}",
                    "${steps.a.output}",
                    "${steps.eval_ties.output}",
                    "${steps.eval_soup.output}",
                    "${steps.eval_student.output}",
                ],
            },
        },
    ]
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output": str(folder / "out"), "steps": steps}), encoding="utf-8")
    root = run_recipe(path, isolate=False, console=Console(file=io.StringIO()))
    return path, root


def test_every_step_wrote_its_output_and_the_report_joins_them(tiny_recipe):
    _, root = tiny_recipe
    comparison = json.loads((root / "report" / "comparison.json").read_text())
    assert [row["label"] for row in comparison["rows"]] == ["base", "a", "ties", "soup", "student"]
    families = {row["label"]: row["family"] for row in comparison["rows"]}
    assert families == {"base": "base", "a": "fine-tuning", "ties": "merge", "soup": "merge", "student": "distillation"}
    student = json.loads((root / "student" / "run.json").read_text())
    chosen = json.loads((root / "best" / "run.json").read_text())["chosen"]
    assert student["inputs"]["teacher"]["folder"] == chosen  # the student learned from the selected merge
    assert set(comparison["verdicts"]) == {"a", "ties", "soup", "student"}
    assert (root / "report" / "report.html").is_file() and (root / "steps" / "ties.yaml").is_file()


def test_rerun_keeps_every_finished_step(tiny_recipe):
    path, root = tiny_recipe
    before = {p.name: p.stat().st_mtime_ns for p in root.glob("*/run.json")}
    console = Console(record=True, width=200, file=io.StringIO())
    run_recipe(path, isolate=False, console=console)
    assert "unchanged, kept" in console.export_text()
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("*/run.json")} == before


@pytest.mark.parametrize("quick", [False, True])
def test_demo_recipes_validate_and_hold_out_what_the_soup_scores(quick):
    recipe = load_recipe(demo_recipe(quick), KINDS)
    steps = {step.name: step for step in recipe.steps}
    trained = max(s.config["data"]["limit"] for s in recipe.steps if s.kind == "finetune")
    for held in (s for s in recipe.steps if s.name == "heldout"):
        assert held.config["start"] >= trained  # the soup never scores records an expert trained on
    assert steps["report"].config["baseline"] == "base"
    assert {s.kind for s in recipe.steps} >= {"eval", "finetune", "merge", "data", "distill", "compare"}


def test_demo_without_a_kind_drops_its_steps_and_their_report_rows():
    recipe = config_io.load(demo_recipe(), Recipe)
    kinds = {**KINDS, "merge": Kind(run=KINDS["merge"].run, check=KINDS["merge"].check, needs="lmforge.not_here")}
    kept, missing = available_steps(recipe, kinds)
    names = {step.name for step in kept.steps}
    assert missing == ["merge"]
    assert not any(name.startswith(("merge_", "eval_merge_")) for name in names)
    assert not {"best_merge", "student", "eval_student"} & names  # they needed a merge
    report = next(step for step in kept.steps if step.name == "report")
    assert report.config["runs"] == [
        "base=${steps.base.output}",
        "${steps.eval_expert_dates.output}",
        "${steps.eval_expert_extraction.output}",
        "${steps.eval_moe.output}",  # the mixture of experts is its own kind (moe)
        "${steps.eval_ensemble.output}",  # the experts fused at generation: an eval step, no merge
        "${steps.eval_edit_profs.output}",  # the edit of the base model needs no merge either
    ]
