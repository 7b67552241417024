"""The shipped teacher-assistant recipe, shrunk to a tiny model: the chain teacher -> assistant -> student runs in
one recipe and the student is pruned from, and distilled from, the assistant (not the teacher)."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from rich.console import Console

from lmforge import config as config_io
from lmforge.models.tiny import make_tiny_llama
from lmforge.recipe.demo import RECIPES
from lmforge.recipe.kinds import KINDS
from lmforge.recipe.runner import run_recipe
from lmforge.recipe.schema import Recipe, load_recipe

SHIPPED = RECIPES / "teacher_assistant.yaml"
SMALL = {
    "finetune": {
        "data": {"limit": 16, "max_length": 512},
        "train": {"max_steps": 1, "save_every": 100},
        "eval": {"limit": 1},
    },
    "distill": {
        "data": {"max_length": 512},
        "train": {"max_steps": 2, "save_every": 100, "eval_every": 100},
        "eval": {"limit": 1},
    },
    "data": {"count": 16},
    "eval": {"limit": 1, "footprint": False},
}


def merged(base: dict, small: dict) -> dict:
    out = dict(base)
    for key, value in small.items():
        out[key] = merged(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    model = make_tiny_llama(tmp_path_factory.mktemp("ta_teacher"), hidden=64, intermediate=128, layers=2, seed=0)
    recipe = config_io.to_dict(config_io.load(SHIPPED, Recipe))
    for step in recipe["steps"]:
        step["config"] = merged(step["config"], SMALL.get(step["kind"], {}))
        if step["config"].get("model") == "default":
            step["config"]["model"] = str(model)
        if step["kind"] == "eval":
            step["config"]["tasks"] = ["extraction"]
    folder = tmp_path_factory.mktemp("ta")
    recipe["output"] = str(folder / "out")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return run_recipe(path, isolate=False, console=Console(file=io.StringIO()))


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def params(folder) -> int:
    return json.loads((folder / "run.json").read_text())["params_total"]


def test_the_shipped_recipe_validates_and_chains_through_the_assistant():
    steps = {step.name: step for step in load_recipe(SHIPPED, KINDS).steps}
    assert steps["student"].config["teacher"] == "${steps.assistant.output}"
    assert (
        steps["assistant"].config["teacher"] == steps["student_direct"].config["teacher"] == "${steps.teacher.output}"
    )


def test_the_student_is_built_from_and_taught_by_the_assistant(chain):
    run = json.loads((chain / "student" / "run.json").read_text())
    assert run["inputs"]["teacher"]["folder"] == str(chain / "assistant")
    direct = json.loads((chain / "student_direct" / "run.json").read_text())
    assert direct["inputs"]["teacher"]["folder"] == str(chain / "teacher")
    teacher, assistant, student = (config_of(chain / name) for name in ("teacher", "assistant", "student"))
    assert (
        student["hidden_size"] < assistant["hidden_size"]
        or student["intermediate_size"] < assistant["intermediate_size"]
    )
    assert assistant["intermediate_size"] < teacher["intermediate_size"]
    assert params(chain / "student") < params(chain / "assistant") < params(chain / "teacher")
    # a student pruned from the teacher would have the same target and the teacher's widths to choose from;
    # the chained student's fraction of the assistant is what the recipe asks for
    assert params(chain / "student") <= 0.33 * params(chain / "assistant")
    report = json.loads((chain / "report" / "comparison.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["teacher", "assistant", "student", "student_direct"]
