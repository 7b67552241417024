"""The `run`, `demo` and `compare` verbs: flag parsing only, each over one library function.

Kept out of cli.py so that file stays one screen; cli.py registers these functions. Nothing heavy is
imported until a verb runs, so `lmforge --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def run_command(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML: named steps (finetune, distill, merge, eval, ...)")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan with time and memory estimates")] = False,
    overwrite: Annotated[bool, typer.Option(help="rerun every step and replace existing outputs")] = False,
    out: Annotated[Path | None, typer.Option(help="output folder (default: the recipe's `output`)")] = None,
) -> None:
    """Run a recipe: steps in order, finished unchanged steps skipped, one report at the end."""
    from lmforge.recipe.runner import run_recipe

    run_recipe(recipe, out=out, dry_run=dry_run, overwrite=overwrite, console=console)


def demo_command(
    quick: Annotated[bool, typer.Option(help="the smaller demo (fewer merges and steps, fewer test records)")] = False,
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/demo, runs/demo-quick)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan with time and memory estimates")] = False,
    overwrite: Annotated[bool, typer.Option(help="rerun every step")] = False,
) -> None:
    """Fine-tune two experts, merge them seven ways, distill the best merge, and compare everything."""
    from lmforge.recipe.demo import demo

    demo(out=out, quick=quick, dry_run=dry_run, overwrite=overwrite, console=console)


def compare_command(
    runs: Annotated[list[str], typer.Argument(help="run folders (eval, finetune, merge, distill), or LABEL=FOLDER")],
    baseline: Annotated[str | None, typer.Option(help="row label the deltas are against (default: the first)")] = None,
    out: Annotated[Path | None, typer.Option(help="also write report.md, report.html and plots/ here")] = None,
    title: Annotated[str, typer.Option(help="report title")] = "lmforge comparison",
    overwrite: Annotated[bool, typer.Option(help="replace an existing report folder")] = False,
) -> None:
    """One table from any run folders, with deltas against a baseline and the method comparison."""
    from lmforge.report.compare import compare, print_comparison

    comparison = compare(runs, baseline=baseline, out=out, title=title, overwrite=overwrite)
    print_comparison(comparison, console)
    if out is not None:
        console.print(f"report in {out / 'report.html'} and {out / 'report.md'}")
