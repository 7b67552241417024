"""Recipes rerun a step when a file or folder it reads changes, even one no lmforge command wrote.

The step kind here reads the model folder it is given for real (the sum of its embedding matrix, through
safetensors) and records its calls; the runner, the unit under test, is the product's.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from safetensors import safe_open

from lmforge import config as config_io
from lmforge.models.tiny import make_tiny_llama
from lmforge.outputs import staged_output
from lmforge.recipe import estimate
from lmforge.recipe.kinds import KINDS, Kind
from lmforge.recipe.runner import STATE_FILE, make_plan, run_recipe
from lmforge.recipe.schema import load_recipe
from lmforge.report.record import write_json


@dataclass(frozen=True)
class ReadStep:
    model: str
    data: str | None = None
    note: str = ""
    output: str | None = None


CALLS: list[str] = []


def _embedding_sum(folder: Path) -> float:
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return float(weights.get_tensor("model.embed_tokens.weight").sum())


def _read_run(config_file: Path, output: Path, overwrite: bool) -> Path:
    step = config_io.load(config_file, ReadStep)
    with staged_output(output, overwrite) as staging:
        write_json(staging / "run.json", {"command": "read", "embedding_sum": _embedding_sum(Path(step.model))})
    CALLS.append(output.name)
    return output


READ = {
    **KINDS,
    "read": Kind(
        run=_read_run,
        check=lambda config, where: config_io.from_dict(config, ReadStep, where),
        estimate=lambda config, facts: estimate.Estimate(1.0, 1e8, "read"),
    ),
}


def _recipe(tmp_path: Path, **config) -> Path:
    path = tmp_path / "r.yaml"
    steps = [{"name": "read", "kind": "read", "config": config}]
    path.write_text(yaml.safe_dump({"output": str(tmp_path / "out"), "steps": steps}), encoding="utf-8")
    return path


def _run(recipe: Path) -> list[str]:
    CALLS.clear()
    run_recipe(recipe, kinds=READ, isolate=False, console=Console(file=io.StringIO()))
    return list(CALLS)


def _header(folder: Path) -> bytes:
    data = (folder / "model.safetensors").read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def test_a_plain_model_folder_replaced_with_new_weights_reruns_the_step(tmp_path):
    model = make_tiny_llama(tmp_path / "base", seed=0)  # no run.json: not written by an lmforge command
    recipe = _recipe(tmp_path, model=str(model))
    assert _run(recipe) == ["read"]
    assert _run(recipe) == []  # nothing changed: kept
    header, size, first = _header(model), (model / "model.safetensors").stat().st_size, _embedding_sum(model)

    make_tiny_llama(model, seed=1)  # retrained weights: same names, shapes, header and size; other values
    assert _header(model) == header and (model / "model.safetensors").stat().st_size == size
    assert _embedding_sum(model) != first

    loaded = load_recipe(recipe, READ)
    state = json.loads((Path(loaded.output) / STATE_FILE).read_text())["steps"]
    assert [(p.runs, p.reason) for p in make_plan(loaded, READ, state)] == [(True, "yes: changed")]
    assert _run(recipe) == ["read"]
    record = json.loads((tmp_path / "out" / "read" / "run.json").read_text())
    assert record["embedding_sum"] == _embedding_sum(model)
    assert _run(recipe) == []


def test_an_edited_data_file_reruns_the_step_and_long_text_is_no_path(tmp_path, tiny_llama):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "completion": "2"}\n', encoding="utf-8")
    long_text = "a system prompt longer than any file name " * 10  # stat() of it fails with ENAMETOOLONG
    recipe = _recipe(tmp_path, model=str(tiny_llama), data=str(data), note=long_text)
    assert _run(recipe) == ["read"]
    assert _run(recipe) == []
    data.write_text('{"prompt": "1+1", "completion": "3"}\n', encoding="utf-8")  # same size, other content
    assert _run(recipe) == ["read"]
