"""The `lmforge distill` verb: flags for the common case over `lmforge.distill(config, overrides)`.

Kept out of cli.py so the distillation command and its flags live with distillation; cli.py registers it.
Nothing here imports torch, so `lmforge --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from lmforge.data.columns import parse_columns

console = Console()


def distill_command(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.sub=value ...]")] = None,
    teacher: Annotated[str | None, typer.Option(help="teacher model reference (default: 'default')")] = None,
    student: Annotated[str | None, typer.Option(help="student model sharing the teacher's tokenizer")] = None,
    student_layers: Annotated[
        int | None, typer.Option("--student-layers", help="build the student from this many teacher layers")
    ] = None,
    task: Annotated[str | None, typer.Option(help="built-in task to distill on (its train split)")] = None,
    data: Annotated[str | None, typer.Option(help="data file or folder to distill on")] = None,
    columns: Annotated[
        str | None, typer.Option(help="map your keys, e.g. prompt=question,completion=answer (data.columns)")
    ] = None,
    general_ratio: Annotated[
        float | None, typer.Option("--general-ratio", help="general rows per task row (default 1; 0: task only)")
    ] = None,
    general_file: Annotated[
        str | None,
        typer.Option("--general-file", help="general text (.jsonl with text, or .txt); default: teacher samples"),
    ] = None,
    out: Annotated[str | None, typer.Option(help="output model folder")] = None,
    steps: Annotated[int | None, typer.Option(help="optimiser steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
) -> None:
    """Distil a teacher into a smaller student (built from its layers, or given); flags override the config."""
    from lmforge.distill.run import distill
    from lmforge.overrides import command_line

    flags = {
        "--teacher": ("teacher", teacher),
        "--student": ("student", student),
        "--student-layers": ("student_layers", student_layers),
        "--task": ("data.task", task),
        "--data": ("data.path", data),
        "--columns": ("data.columns", parse_columns(columns)),
        "--general-ratio": ("general.ratio", general_ratio),
        "--general-file": ("general.file", general_file),
        "--out": ("output", out),
        "--steps": ("train.max_steps", steps),
        "--lr": ("train.lr", lr),
        "--overwrite": ("overwrite", overwrite),
        "--resume": ("resume", resume),
    }
    console.print(f"distilled student in {distill(*command_line(args, flags))}")
