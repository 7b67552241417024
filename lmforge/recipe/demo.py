"""`lmforge demo`: the built-in recipe that answers which of fine-tuning, distillation and merging pays off.

The recipes are data (recipes/demo.yaml, recipes/demo_quick.yaml), run by the ordinary recipe runner: two LoRA
experts on two built-in tasks, merges of the two (linear, task_arithmetic, ties, dare_ties, slerp and a greedy
soup), a mixture of experts of the two (`lmforge moe`), their ensemble (`eval --fuse`), the best merge
distilled into a smaller student (on task and general text: issue 17), every model scored on both tasks, the
probe and its footprint, and the
comparison report. A step whose kind is not in this install (an optional command not built yet) is left out
with a note, together with the steps that need its output; a report (compare step) only loses the run folders
that cite it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rich.console import Console

from lmforge import config as config_io
from lmforge.recipe.kinds import KINDS, Kind
from lmforge.recipe.runner import run_recipe
from lmforge.recipe.schema import Recipe, Step, references

RECIPES = Path(__file__).parent / "recipes"


def demo_recipe(quick: bool = False) -> Path:
    """Path of the built-in demo recipe (the quick one runs fewer, shorter steps)."""
    return RECIPES / ("demo_quick.yaml" if quick else "demo.yaml")


def demo(
    out: str | Path | None = None,
    quick: bool = False,
    dry_run: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
) -> Path:
    """Run the built-in demo recipe into `out` (default: the recipe's own, runs/demo or runs/demo-quick);
    returns the folder (the report is in OUT/report/)."""
    console = console or Console()
    recipe = config_io.load(demo_recipe(quick), Recipe)
    recipe, dropped = available_steps(recipe, KINDS)
    if dropped:
        console.print(f"[yellow]not in this install: {', '.join(dropped)}; the demo runs without those steps[/yellow]")
    return run_recipe(recipe, out=out, dry_run=dry_run, overwrite=overwrite, console=console)


def available_steps(recipe: Recipe, kinds: Mapping[str, Kind]) -> tuple[Recipe, list[str]]:
    """The recipe without steps of missing kinds and without what needs their outputs."""
    gone = {s.name for s in recipe.steps if s.kind in kinds and kinds[s.kind].missing()}
    missing_kinds = sorted({s.kind for s in recipe.steps if s.name in gone})
    steps: list[Step] = []
    for step in recipe.steps:  # a recipe cites earlier steps, so one pass sees every removal first
        if step.name in gone:
            continue
        config = _drop_items(step.config, gone) if step.kind == "compare" else step.config
        if any(name in gone for name in references(config, step.name)):
            gone.add(step.name)
            continue
        steps.append(Step(step.name, step.kind, config))
    return Recipe(steps=steps, output=recipe.output, description=recipe.description), missing_kinds


def _drop_items(value, gone: set[str]):
    """A compare step's list items that cite a removed step are removed."""
    if isinstance(value, Mapping):
        return {key: _drop_items(item, gone) for key, item in value.items()}
    if isinstance(value, list):
        return [_drop_items(v, gone) for v in value if not any(n in gone for n in references(v, "demo"))]
    return value
