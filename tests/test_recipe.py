"""Recipes: validation before anything runs, order by reference, resume by fingerprint, dry-run plans.

The runner is exercised with a fake step kind injected here (tests only), which records its calls; the
real kinds are covered by a tiny end-to-end recipe and by one step run in a child process.
"""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from lmforge import cli
from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.outputs import staged_output
from lmforge.recipe import estimate, runner
from lmforge.recipe.kinds import KINDS, Kind
from lmforge.recipe.runner import STATE_FILE, make_plan, run_recipe
from lmforge.recipe.schema import Recipe, Step, load_recipe, order
from lmforge.report.record import write_json


@dataclass(frozen=True)
class FakeStep:
    value: int = 0
    source: str | None = None
    output: str | None = None


CALLS: list[str] = []


def _fake_run(config_file: Path, output: Path, overwrite: bool) -> Path:
    step = config_io.load(config_file, FakeStep)
    if step.value < 0:
        raise UserError("fake step refuses negative values")
    with staged_output(output, overwrite) as staging:
        write_json(staging / "run.json", {"command": "fake", "value": step.value, "source": step.source})
    CALLS.append(output.name)
    return output


FAKE = {
    **KINDS,
    "fake": Kind(
        run=_fake_run,
        check=lambda config, where: config_io.from_dict(config, FakeStep, where),
        estimate=lambda config, facts: estimate.Estimate(10.0 * (config.get("value") or 1), 1e9, "fake"),
    ),
}


def write_recipe(path: Path, steps: list[dict], **top) -> Path:
    path.write_text(yaml.safe_dump({"output": str(path.parent / "out"), **top, "steps": steps}), encoding="utf-8")
    return path


def chain(value_b: int = 2) -> list[dict]:
    """c is listed first but cites b, which cites a: the runner must reorder."""
    return [
        {"name": "c", "kind": "fake", "config": {"value": 3, "source": "${steps.b.output}"}},
        {"name": "a", "kind": "fake", "config": {"value": 1}},
        {"name": "b", "kind": "fake", "config": {"value": value_b, "source": "${steps.a.output}/sub"}},
    ]


def run(path: Path, **kwargs) -> Path:
    CALLS.clear()
    return run_recipe(path, kinds=FAKE, isolate=False, console=Console(file=io.StringIO()), **kwargs)


def test_steps_run_in_reference_order_and_see_earlier_outputs(tmp_path):
    root = run(write_recipe(tmp_path / "r.yaml", chain()))
    assert CALLS == ["a", "b", "c"]
    b = json.loads((root / "b" / "run.json").read_text())
    assert b["source"] == f"{root / 'a'}/sub"  # substituted inside a longer string, absolute
    written = yaml.safe_load((root / "steps" / "c.yaml").read_text())  # each step's config, as a file
    assert written == {"value": 3, "source": str(root / "b"), "output": str(root / "c")}
    state = json.loads((root / STATE_FILE).read_text())["steps"]
    assert set(state) == {"a", "b", "c"} and state["a"]["output"] == str(root / "a")


def test_resume_skips_unchanged_steps_and_reruns_what_a_change_reaches(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", chain())
    run(recipe)
    run(recipe)
    assert CALLS == []  # nothing changed: everything kept
    write_recipe(recipe, chain(value_b=5))
    run(recipe)
    assert CALLS == ["b", "c"]  # b's config changed; c cites b, whose run.json changed
    run(recipe, overwrite=True)
    assert CALLS == ["a", "b", "c"]


def test_failed_step_keeps_finished_ones_and_resumes(tmp_path):
    steps = chain()
    steps[2]["config"]["value"] = -1  # b fails
    recipe = write_recipe(tmp_path / "r.yaml", steps)
    with pytest.raises(UserError, match="negative"):
        run(recipe)
    assert CALLS == ["a"]
    run(write_recipe(recipe, chain()))
    assert CALLS == ["b", "c"]  # a was recorded before b failed


def test_a_quick_first_step_does_not_collapse_the_eta(tmp_path):
    """The fake steps finish in milliseconds against 10-30 s estimated: three such steps are too little evidence
    to scale the rest of the recipe down to nothing (a 0 s data step once turned a 55 min ETA into 2.6 min)."""
    console = Console(file=io.StringIO(), width=200)
    run_recipe(write_recipe(tmp_path / "r.yaml", chain()), kinds=FAKE, isolate=False, console=console)
    etas = [int(x) for x in re.findall(r"recipe ETA (\d+) s", console.file.getvalue())]
    assert len(etas) == 3 and etas[0] == 60  # 10 + 20 + 30 s estimated, nothing measured yet
    assert etas[2] >= 30 * 0.5  # c's 30 s still counts after a and b ran in ~0 s of their 30 s
    assert runner.eta_pace(600.0, 300.0) > 1.5  # with real evidence the measured pace wins


def test_dry_run_plans_without_running(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", chain())
    console = Console(record=True, width=200, file=io.StringIO())
    run_recipe(recipe, dry_run=True, kinds=FAKE, isolate=False, console=console)
    text = console.export_text()
    assert not (tmp_path / "out").exists()
    assert "estimated total: 60 s for 3 of 3 steps" in text and "rates measured" in text
    assert text.index(" a ") < text.index(" b ") < text.index(" c ")


def test_plan_marks_kept_steps_and_downstream_reruns(tmp_path):
    recipe_path = write_recipe(tmp_path / "r.yaml", chain())
    run(recipe_path)
    recipe = load_recipe(write_recipe(recipe_path, chain(value_b=7)), FAKE)
    root = Path(recipe.output)
    state = json.loads((root / STATE_FILE).read_text())["steps"]
    plan = {p.step.name: p for p in make_plan(recipe, FAKE, state)}
    assert not plan["a"].runs and plan["b"].runs and plan["c"].runs
    assert plan["c"].reason == "yes: b reruns"


def test_an_output_the_recipe_did_not_write_is_refused_before_anything_runs(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", chain())
    (tmp_path / "out" / "c").mkdir(parents=True)
    with pytest.raises(UserError, match="does not record it: pass --overwrite"):
        run(recipe)
    assert CALLS == []


def one(kind: str, config: dict | None = None, **step) -> dict:
    """A recipe of one step."""
    return {"steps": [{"name": "a", "kind": kind, **({"config": config} if config is not None else {}), **step}]}


CYCLE = {
    "steps": [
        {"name": "a", "kind": "fake", "config": {"source": "${steps.b.output}"}},
        {"name": "b", "kind": "fake", "config": {"source": "${steps.a.output}"}},
    ]
}
BAD = [
    ("steps: [", "invalid YAML at line"),
    (one("finetuen", {}), "unknown step kind 'finetuen': did you mean 'finetune'"),
    (one("fake", {"source": "${steps.nope.output}"}), "cites missing step 'nope'"),
    (one("fake", {"source": "${steps.a.output}"}), "cites its own output"),
    (CYCLE, "cycle: a -> b -> a"),
    (one("eval", {"model": "/nowhere/m", "tasks": ["dates"]}), "model '/nowhere/m'"),
    (one("merge", {"merge_method": "linear", "models": [{"model": "default+/no/adapter"}]}), "'/no/adapter'"),
    (one("fake", confg={}), "unknown key 'steps[0].confg'"),
    (one("fake", {"vaule": 1}), "unknown key 'vaule': did you mean 'value'"),
    (one("fake", {"source": "${oops}"}), "unknown reference '${oops}'"),
    (one("fake", {"output": "x"}), "remove 'output'"),
    ({"steps": [{"name": "a", "kind": "fake"}, {"name": "a", "kind": "fake"}]}, "two steps share this name"),
    ({"steps": [{"name": "steps", "kind": "fake"}]}, "'steps' is taken"),
    ({"steps": []}, "has no steps"),
    (one("finetune", {"train": {"lrr": 1}}), "unknown key 'train.lrr': did you mean 'train.lr'"),
    (one("merge", {"merge_method": "tie", "models": []}), "did you mean 'ties'"),
]


@pytest.mark.parametrize("content, fragment", BAD, ids=[b[1][:28] for b in BAD])
def test_bad_recipes_are_one_line_errors_before_any_step(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content), encoding="utf-8")
    with pytest.raises(UserError) as err:
        run(path)
    message = str(err.value)
    assert fragment in message and "\n" not in message and str(path) in message
    assert CALLS == [] and not (tmp_path / "out").exists()


def test_cli_run_reports_a_bad_recipe_on_one_line(monkeypatch, capsys, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", [{"name": "a", "kind": "fake", "config": {}}])
    monkeypatch.setattr(sys, "argv", ["lmforge", "run", str(path)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "unknown step kind 'fake'" in err and not (tmp_path / "out").exists()


def test_order_is_file_order_when_nothing_cites_ahead():
    recipe = Recipe(steps=[Step("x", "fake"), Step("y", "fake", {"source": "${steps.x.output}"}), Step("w", "fake")])
    assert [s.name for s in order(recipe)] == ["x", "y", "w"]


def test_a_step_runs_in_a_child_process_and_its_log_is_kept(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [{"name": "mix", "kind": "data", "config": {"tasks": ["dates", "extraction"], "count": 3, "start": 10}}],
    )
    root = run_recipe(recipe, console=Console(file=io.StringIO()))
    lines = [json.loads(line) for line in (root / "mix" / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {"prompt", "completion"}
    assert "Rewrite the date" in lines[0]["prompt"] and "Rewrite the date" not in lines[1]["prompt"]  # interleaved
    assert (root / "steps" / "mix.log").is_file() and (root / "steps" / "mix.yaml").is_file()
    per_task = [(root / "mix" / f"task_{t}.jsonl").read_text().splitlines() for t in ("dates", "extraction")]
    assert [len(lines) for lines in per_task] == [3, 3]
    assert all("Rewrite the date" in json.loads(line)["prompt"] for line in per_task[0])
    assert not any("Rewrite the date" in json.loads(line)["prompt"] for line in per_task[1])


def test_a_user_error_in_a_child_step_names_the_step(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        [{"name": "mix", "kind": "data", "config": {"tasks": ["dates"], "count": 5, "start": 1999}}],
    )
    with pytest.raises(UserError, match=r"step 'mix' \(data\): .*fewer than start \+ count = 2004"):
        run_recipe(recipe, console=Console(file=io.StringIO()))


@pytest.mark.parametrize("verb", ["run", "demo", "compare"])
def test_help_of_the_recipe_verbs(monkeypatch, capsys, verb):
    monkeypatch.setattr(sys, "argv", ["lmforge", verb, "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0 and "Usage" in capsys.readouterr().out
