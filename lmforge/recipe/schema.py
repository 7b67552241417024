"""Recipes: named steps read from YAML and checked whole before any step runs.

A recipe is `{output, description, steps: [{name, kind, config}]}`. Each step's `config` is what that
command's own YAML would hold; a string `${steps.NAME.output}` anywhere in it names an earlier step's result
(a model folder, or a run folder for `eval`), which also orders the steps. `validate` turns every mistake
into one-line `UserError` naming the recipe file, the step and a fix: bad YAML, unknown keys, unknown kinds,
references to missing steps, cycles, model references that do not exist, and each step's config checked by
its command's own config schema. Nothing is loaded or run here but those checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import config as config_io
from lmforge.errors import UserError

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_STEP_OUTPUT = re.compile(r"^steps\.([A-Za-z_][A-Za-z0-9_-]*)\.output$")


@dataclass(frozen=True)
class Step:
    """One command run by the recipe."""

    name: str
    """Unique name: the step's output goes to OUTPUT/NAME (its config and log to OUTPUT/steps/) and later
    steps cite it as ${steps.NAME.output}."""
    kind: str
    """finetune | distill | merge | edit | eval | data | filter | select | compare | export."""
    config: dict[str, Any] = field(default_factory=dict)
    """The command's config, as its own YAML file would hold it; the runner sets the output folder."""


@dataclass(frozen=True)
class Recipe:
    """A list of steps whose outputs feed later steps."""

    steps: list[Step]
    """The steps, run in this order unless a reference needs another."""
    output: str = "runs/recipe"
    """Folder that holds every step's output, the written step configs and the resume state."""
    description: str = ""
    """What the recipe is for (shown in the plan)."""


def load_recipe(path: str | Path, kinds: Mapping[str, Any], output: str | Path | None = None) -> Recipe:
    """Read and validate a recipe file; `output` replaces the recipe's own output folder."""
    recipe = config_io.load(path, Recipe)
    if output is not None:
        recipe = dataclasses.replace(recipe, output=str(output))
    validate(recipe, str(path), kinds)
    return recipe


def references(value: Any, where: str) -> Iterator[str]:
    """Names of the steps that `value` (a config, nested) cites; any other `${...}` is an error."""
    if isinstance(value, str):
        for inner in _PLACEHOLDER.findall(value):
            match = _STEP_OUTPUT.match(inner.strip())
            if not match:
                raise UserError(
                    f"{where}: unknown reference '${{{config_io.printable(inner)}}}': write ${{steps.NAME.output}}"
                )
            yield match.group(1)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from references(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from references(item, where)


def substitute(value: Any, outputs: Mapping[str, str]) -> Any:
    """`value` with every ${steps.NAME.output} replaced by outputs[NAME] (validated references only)."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: outputs[_STEP_OUTPUT.match(m.group(1).strip()).group(1)], value)
    if isinstance(value, Mapping):
        return {key: substitute(item, outputs) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [substitute(item, outputs) for item in value]
    return value


def dependencies(recipe: Recipe, where: str = "recipe") -> dict[str, list[str]]:
    """Step name -> the names of the steps its config cites, in order of first mention."""
    return {s.name: list(dict.fromkeys(references(s.config, step_label(where, s.name)))) for s in recipe.steps}


def order(recipe: Recipe, where: str = "recipe") -> list[Step]:
    """Steps in run order: the file's order, except that a step waits for the steps it cites.

    Raises:
        UserError: a cycle, named step by step (a -> b -> a).
    """
    deps = dependencies(recipe, where)
    by_name = {step.name: step for step in recipe.steps}
    done: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            raise UserError(f"{where}: steps cite each other in a cycle: {' -> '.join(cycle)}: break one reference")
        visiting.append(name)
        for dep in deps[name]:
            visit(dep)
        visiting.pop()
        done.append(name)

    for step in recipe.steps:
        visit(step.name)
    return [by_name[name] for name in done]


def validate(recipe: Recipe, where: str, kinds: Mapping[str, Any]) -> None:
    """Check the whole recipe; the first problem is a one-line UserError naming the step and a fix."""
    if not recipe.steps:
        raise UserError(f"{where}: the recipe has no steps: add a list under 'steps:'")
    names: set[str] = set()
    for step in recipe.steps:
        label = step_label(where, step.name)
        if step.name == "steps":
            raise UserError(f"{label}: 'steps' is taken (OUTPUT/steps/ holds the step configs and logs): rename it")
        if not NAME.match(step.name):
            raise UserError(f"{label}: a step name is letters, digits, '_' and '-', starting with a letter or '_'")
        if step.name in names:
            raise UserError(f"{label}: two steps share this name: rename one")
        names.add(step.name)
        _check_kind(step, label, kinds)
    for step in recipe.steps:
        label = step_label(where, step.name)
        for name in references(step.config, label):
            if name == step.name:
                raise UserError(f"{label} cites its own output: a step can only use earlier steps' outputs")
            if name not in names:
                hint = difflib.get_close_matches(name, names, n=1)
                fix = f"did you mean '{hint[0]}'?" if hint else f"steps are {', '.join(sorted(names))}"
                raise UserError(f"{label} cites missing step '{name}' (${{steps.{name}.output}}): {fix}")
    order(recipe, where)  # cycles
    out = Path(recipe.output)
    for step in recipe.steps:
        label = step_label(where, step.name)
        kind = kinds[step.kind]
        if kind.output_key and kind.output_key in step.config:
            target = config_io.printable(str(out / step.name))
            raise UserError(
                f"{label}: remove '{kind.output_key}': the runner writes each step to OUTPUT/NAME ({target})"
            )
        future = {name: str(out / name) for name in names}  # where each cited output will be
        resolved = substitute(step.config, future)
        if kind.output_key:
            resolved[kind.output_key] = future[step.name]
        kind.check(resolved, label)
        for ref in kind.models(step.config):
            if isinstance(ref, str) and "${" not in ref:
                check_model_ref(ref, label)


def step_label(where: str, name: str) -> str:
    """How errors name a step: the recipe file, then the name as written (line breaks escaped)."""
    return f"{where}: step '{config_io.printable(name)}'"


def _check_kind(step: Step, label: str, kinds: Mapping[str, Any]) -> None:
    if step.kind not in kinds:
        hint = difflib.get_close_matches(step.kind, list(kinds), n=1)
        fix = f"did you mean '{hint[0]}'?" if hint else "use one of " + ", ".join(kinds)
        raise UserError(f"{label}: unknown step kind '{config_io.printable(step.kind)}': {fix}")
    missing = kinds[step.kind].missing()
    if missing:
        raise UserError(f"{label}: step kind '{step.kind}' is not available in this install ({missing})")


def check_model_ref(ref: str, label: str) -> None:
    """A model reference must exist before the recipe starts: 'default', a .gguf file, a model folder,
    BASE+ADAPTER (merge), or a hub id (not looked up here: the step fetches it)."""
    shown = config_io.printable(ref if len(ref) <= 80 else ref[:77] + "...")
    if not ref.isprintable():  # a line break would also break the one-line error below
        raise UserError(f"{label}: model '{shown}' holds a control character or line break: fix the reference")
    try:
        _check_model_ref(ref, label)
    except OSError as err:  # a name the file system refuses outright, e.g. one part over 255 bytes
        raise UserError(f"{label}: model '{shown}': {err.strerror}: fix the path or cite a step's output") from None


def _check_model_ref(ref: str, label: str) -> None:
    from lmforge.models.load import DEFAULT_REF, check_model_folder, could_be_hub_id, default_gguf_path

    if "+" in ref and not Path(ref).exists():  # BASE+ADAPTER (merge): check both parts
        base, adapter = ref.rsplit("+", 1)
        check_model_ref(base, label)
        if not Path(adapter).is_dir():
            raise UserError(f"{label}: adapter folder '{adapter}' of '{ref}' not found: fix the path")
        return
    try:
        if ref == DEFAULT_REF:
            default_gguf_path()
            return
        path = Path(ref).expanduser()
        if ref.endswith(".gguf"):
            if not path.is_file():
                raise UserError(f"GGUF file not found: {path}")
            return
        if path.exists():
            check_model_folder(path)
            return
        if could_be_hub_id(ref):
            return
        raise UserError(f"model folder not found: {path}")
    except UserError as err:
        raise UserError(f"{label}: model '{ref}': {err}; fix the path or cite a step's output") from None


def models_at(config: Mapping[str, Any], *keys: str) -> list[str]:
    """The string values at dotted `keys` of a config (absent keys skipped)."""
    found = []
    for key in keys:
        value: Any = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str):
            found.append(value)
    return found


def merge_models(config: Mapping[str, Any]) -> list[str]:
    """Model references in a mergekit config: models[].model, base_model, slices[].sources[].model."""
    found = models_at(config, "base_model")
    entries = list(config.get("models") or [])
    for piece in config.get("slices") or []:
        entries += piece.get("sources") or [] if isinstance(piece, dict) else []
    for entry in entries:
        found += [entry] if isinstance(entry, str) else models_at(entry, "model") if isinstance(entry, dict) else []
    return found


Checker = Callable[[dict, str], None]
