"""The public API: six commands that each take a YAML path, a dict or keyword arguments, and are the real
functions (their own signature and docstring), whichever of their packages were imported before."""

from __future__ import annotations

import importlib
import inspect
import json
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lmforge
from lmforge.errors import UserError
from lmforge.models.tiny import make_tiny_llama

FORMS = ["path", "dict", "keywords"]
QUICK = {"max_steps": 1, "batch_size": 4, "save_every": 100}


def call(function, form: str, config: dict, tmp_path: Path, overrides=(), **kwargs):
    """Call `function` with `config` as a YAML file, as a dict, or as keyword arguments."""
    if form == "path":
        path = tmp_path / f"{function.__name__}.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return function(path, overrides=overrides, **kwargs) if overrides else function(path, **kwargs)
    if form == "dict":
        return function(config, overrides=overrides, **kwargs) if overrides else function(config, **kwargs)
    return function(overrides=overrides, **config, **kwargs) if overrides else function(**config, **kwargs)


@pytest.fixture(scope="module")
def student_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("api_student"), seed=5)


@pytest.fixture(scope="module")
def teacher_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("api_teacher"), layers=4, seed=6)


@pytest.fixture(scope="module")
def preferences(tmp_path_factory):
    path = tmp_path_factory.mktemp("api_prefs") / "prefs.jsonl"
    rows = [{"prompt": f"Is {n} even?", "chosen": "yes" if n % 2 == 0 else "no", "rejected": "maybe"} for n in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("form", FORMS)
def test_finetune_takes_each_form(form, student_model, tmp_path):
    config = {
        "output": str(tmp_path / "sft"),
        "model": str(student_model),
        "data": {"task": "dates", "limit": 8},
        "train": QUICK,
        "eval": {"limit": 1, "probe": False},
    }
    # The override wins over the config: one key from each source reaches the run.
    out = call(lmforge.finetune, form, config, tmp_path, overrides=["lora.r=2"])
    assert out == tmp_path / "sft" and (out / "adapter_model.safetensors").is_file()
    written = yaml.safe_load((out / "lmforge.yaml").read_text())
    assert written["lora"]["r"] == 2 and written["train"]["max_steps"] == 1 and written["data"]["limit"] == 8


@pytest.mark.parametrize("form", FORMS)
def test_dpo_takes_each_form(form, student_model, preferences, tmp_path):
    config = {
        "output": str(tmp_path / "dpo"),
        "model": str(student_model),
        "data": {"path": str(preferences), "val_fraction": 0.25},
        "train": QUICK,
        "eval": {"probe": False},
        "beta": 0.2,
    }
    out = call(lmforge.dpo, form, config, tmp_path)
    assert (out / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((out / "lmforge.yaml").read_text())["beta"] == 0.2


@pytest.mark.parametrize("form", FORMS)
def test_distill_takes_each_form(form, teacher_model, tmp_path):
    config = {
        "output": str(tmp_path / "student"),
        "teacher": str(teacher_model),
        "student_layers": 2,
        "data": {"task": "dates", "limit": 8},
        "train": QUICK,
        "eval": {"limit": 1, "probe": False},
    }
    out = call(lmforge.distill, form, config, tmp_path)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


@pytest.mark.parametrize("form", FORMS)
def test_merge_takes_each_form(form, student_model, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(student_model), "parameters": {"weight": 1.0}}]}
    out = call(lmforge.merge, form, config, tmp_path, out=tmp_path / "merged", progress=False)
    assert (out / "model.safetensors").is_file()
    assert yaml.safe_load((out / "lmforge.yaml").read_text())["merge_method"] == "linear"


@pytest.mark.parametrize("form", FORMS)
def test_evaluate_takes_each_form(form, student_model, tmp_path):
    config = {"model": str(student_model), "tasks": ["dates"], "footprint": False}
    results = call(lmforge.evaluate, form, config, tmp_path, overrides=["limit=2"])
    assert results["n-samples"]["dates"]["effective"] == 2 and results["footprint"] is None


def test_evaluate_keeps_its_positional_form(student_model):
    results = lmforge.evaluate(str(student_model), ["dates"], limit=1, footprint=False)
    assert results["n-samples"]["dates"]["effective"] == 1


@pytest.mark.parametrize("form", FORMS)
def test_run_takes_each_form(form, tmp_path):
    config = {
        "output": str(tmp_path / "recipe"),
        "steps": [{"name": "records", "kind": "data", "config": {"tasks": ["dates"], "count": 3}}],
    }
    root = call(lmforge.run, form, config, tmp_path, isolate=False)
    assert len((root / "records" / "train.jsonl").read_text().splitlines()) == 3


def test_keyword_sections_merge_into_a_config_file(student_model, tmp_path):
    """A keyword section sets only the keys it names; the file's other keys in that section stay."""
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump({"output": "unused", "model": "m", "train": {"lr": 0.5, "max_steps": 7}}))
    with pytest.raises(UserError, match="^keyword argument: train.max_steps must be >= 1, got 0$"):
        lmforge.finetune(path, train={"max_steps": 0})


@pytest.mark.parametrize(
    ("name", "parameters"),
    [
        ("finetune", ["config", "overrides", "settings"]),
        ("dpo", ["config", "overrides", "settings"]),
        ("distill", ["config", "overrides", "settings"]),
        ("merge", ["config", "out", "overwrite", "overrides", "options"]),
        ("evaluate", ["model", "tasks", "limit", "overrides"]),
        ("run", ["recipe", "out", "dry_run", "overrides", "settings"]),
    ],
)
def test_help_shows_the_real_signature_and_docstring(name, parameters):
    function = getattr(lmforge, name)
    text = pydoc.render_doc(function, renderer=pydoc.plaintext)
    assert inspect.getdoc(function).splitlines()[0] in text
    for parameter in parameters:
        assert parameter in inspect.signature(function).parameters and parameter in text


@pytest.mark.parametrize("package", ["lmforge.finetune.sft", "lmforge.merge.run", "lmforge.distill.run"])
def test_importing_a_subpackage_leaves_the_function(package):
    importlib.import_module(package)
    name = package.split(".")[1]
    function = getattr(lmforge, name)
    assert inspect.isfunction(function) and function.__module__ == package


def test_dir_lists_the_public_api():
    listed = dir(lmforge)
    for name in ("finetune", "dpo", "distill", "merge", "evaluate", "run", "tune", "load_model", "compare"):
        assert name in listed and name in lmforge.__all__


def test_the_cli_starts_without_torch():
    code = "import sys, lmforge.cli, lmforge; dir(lmforge); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_evaluate_arguments_win_over_a_config_even_at_their_default(student_model):
    """An argument given beside a config is applied over it, also when it equals EvalConfig's default."""
    config = {"model": str(student_model), "tasks": ["dates"], "limit": 1, "num_fewshot": 1, "footprint": False}
    assert lmforge.evaluate(config)["n-shot"]["dates"] == 1
    assert lmforge.evaluate(config, num_fewshot=0)["n-shot"]["dates"] == 0
