"""The `lmforge` command: a one-screen shell over the Python API [mk run_yaml, lg CLI].

Each verb parses its flags and calls one library function. A `UserError` becomes one line on stderr and
exit status 2, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lmforge import logs
from lmforge.data.columns import parse_columns
from lmforge.distill.command import distill_command
from lmforge.errors import UserError
from lmforge.merge.command import merge_command
from lmforge.merge.moe_command import moe_command
from lmforge.recipe.command import compare_command, demo_command, run_command

app = typer.Typer(
    help="Make a language model better for a job: fine-tune, distill, merge, and compare honestly.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect data files and export built-in tasks.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()


@app.command("eval")
def eval_command(
    model: Annotated[
        list[str], typer.Argument(help="'default', a model folder, a .gguf file or a hub id; several with --fuse")
    ],
    task: Annotated[
        list[str], typer.Option("--task", "-t", help="built-in task name, .jsonl file or lm-eval task .yaml; repeat")
    ],
    limit: Annotated[int | None, typer.Option(help="score only the first N records per task")] = None,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", "-k", help="k-shot examples per prompt")] = 0,
    fewshot_file: Annotated[
        Path | None, typer.Option(help=".jsonl of k-shot examples for .jsonl tasks (default: hold k out of the task)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="requests per forward pass")] = 8,
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/eval/<model>-<time>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    footprint: Annotated[bool, typer.Option(help="measure size, speed and memory")] = True,
    columns: Annotated[
        str | None, typer.Option(help="map a .jsonl task's keys, e.g. prompt=question,answer=solution")
    ] = None,
    apply_chat_template: Annotated[
        bool, typer.Option(help="task .yaml prompts through the model's chat template, as lm-eval's flag")
    ] = False,
    system_instruction: Annotated[str | None, typer.Option(help="system prompt for task .yaml prompts")] = None,
    fuse: Annotated[
        str | None,
        typer.Option(help="score the models fused at generation: ensemble | product | dexperts | contrastive"),
    ] = None,
    fuse_weights: Annotated[str | None, typer.Option(help="ensemble/product weights, one per model: 0.7,0.3")] = None,
    fuse_alpha: Annotated[
        float | None, typer.Option(help="dexperts: scale of (tuned - untuned), 1; contrastive: cut-off, 0.1")
    ] = None,
) -> None:
    """Score a model on tasks; write results.json, samples and run.json; print the table."""
    from lmforge.eval.fusion import parse_weights
    from lmforge.eval.run import run_eval
    from lmforge.report.tables import print_results

    folder, results = run_eval(
        model[0] if len(model) == 1 and fuse is None else model,
        task,
        out_dir=out,
        overwrite=overwrite,
        limit=limit,
        num_fewshot=num_fewshot,
        fewshot_file=fewshot_file,
        batch_size=batch_size,
        footprint=footprint,
        dtype=dtype,
        columns=parse_columns(columns),
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
        fuse=fuse,
        fuse_weights=parse_weights(fuse_weights),
        fuse_alpha=fuse_alpha,
    )
    print_results(results, console)
    console.print(f"results in {folder}")


@app.command("finetune")
def finetune_command(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.sub=value ...]")] = None,
    model: Annotated[str | None, typer.Option(help="model reference (default: 'default')")] = None,
    task: Annotated[str | None, typer.Option(help="built-in task to train on (its train split)")] = None,
    data: Annotated[str | None, typer.Option(help="data file or folder to train on")] = None,
    columns: Annotated[
        str | None, typer.Option(help="map your keys, e.g. prompt=question,completion=answer (data.columns)")
    ] = None,
    out: Annotated[str | None, typer.Option(help="output model folder")] = None,
    method: Annotated[str | None, typer.Option(help="lora | full")] = None,
    steps: Annotated[int | None, typer.Option(help="optimiser steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    merge: Annotated[bool, typer.Option(help="merge the LoRA adapter into the weights")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
) -> None:
    """Supervised fine-tuning (LoRA or full) with a forgetting report; flags override the config file."""
    from lmforge.finetune.sft import finetune
    from lmforge.overrides import command_line

    flags = {
        "--model": ("model", model),
        "--task": ("data.task", task),
        "--data": ("data.path", data),
        "--columns": ("data.columns", parse_columns(columns)),
        "--out": ("output", out),
        "--method": ("method", method),
        "--steps": ("train.max_steps", steps),
        "--lr": ("train.lr", lr),
        "--merge": ("merge", merge),
        "--overwrite": ("overwrite", overwrite),
        "--resume": ("resume", resume),
    }
    folder = finetune(*command_line(args, flags))
    console.print(f"fine-tuned model in {folder}")


@app.command("dpo")
def dpo_command(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.sub=value ...]")] = None,
    model: Annotated[str | None, typer.Option(help="model reference (default: 'default')")] = None,
    data: Annotated[str | None, typer.Option(help="preference data file (prompt, chosen, rejected)")] = None,
    columns: Annotated[
        str | None, typer.Option(help="map your keys, e.g. chosen=good,rejected=bad (data.columns)")
    ] = None,
    out: Annotated[str | None, typer.Option(help="output model folder")] = None,
    method: Annotated[str | None, typer.Option(help="lora | full")] = None,
    loss: Annotated[str | None, typer.Option(help="sigmoid | ipo")] = None,
    beta: Annotated[float | None, typer.Option(help="KL strength (> 0)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimiser steps")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
) -> None:
    """Preference tuning (DPO or IPO), LoRA or full; flags override the config file."""
    from lmforge.finetune.dpo import dpo
    from lmforge.overrides import command_line

    flags = {
        "--model": ("model", model),
        "--data": ("data.path", data),
        "--columns": ("data.columns", parse_columns(columns)),
        "--out": ("output", out),
        "--method": ("method", method),
        "--loss": ("loss_type", loss),
        "--beta": ("beta", beta),
        "--steps": ("train.max_steps", steps),
        "--lr": ("train.lr", lr),
        "--overwrite": ("overwrite", overwrite),
        "--resume": ("resume", resume),
    }
    console.print(f"preference-tuned model in {dpo(*command_line(args, flags))}")


@app.command("edit")
def edit_command(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.sub=value ...]")] = None,
    method: Annotated[str | None, typer.Option(help="profs")] = None,
    data: Annotated[str | None, typer.Option(help="preference data file (prompt, chosen, rejected)")] = None,
    out: Annotated[str | None, typer.Option(help="output model folder")] = None,
    model: Annotated[str | None, typer.Option(help="model reference (default: 'default')")] = None,
    k: Annotated[int | None, typer.Option(help="dimensions removed per layer (default 2)")] = None,
    layers: Annotated[str | None, typer.Option(help="layer indices, e.g. 15,16,17 (default: upper half)")] = None,
    columns: Annotated[str | None, typer.Option(help="map your keys, e.g. chosen=good,rejected=bad")] = None,
    limit: Annotated[int | None, typer.Option(help="use N pairs drawn at random")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
) -> None:
    """Edit a model from preference pairs without training (ProFS); flags override the config file."""
    from lmforge.edit.run import edit
    from lmforge.overrides import command_line

    flags = {
        "--method": ("method", method),
        "--data": ("data", data),
        "--out": ("output", out),
        "--model": ("model", model),
        "--k": ("k", k),
        "--layers": ("layers", _layer_list(layers)),
        "--columns": ("columns", parse_columns(columns)),
        "--limit": ("limit", limit),
        "--overwrite": ("overwrite", overwrite),
    }
    console.print(f"edited model in {edit(*command_line(args, flags))}")


def _layer_list(text: str | None) -> list[int] | None:
    """--layers '15,16,17' -> [15, 16, 17]."""
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"bad --layers '{text}': write layer indices separated by commas, e.g. 15,16,17") from None


@app.command("tune")
def tune_command(
    args: Annotated[list[str], typer.Argument(help="CONFIG.yaml [key.sub=value ...]")],
    trials: Annotated[int | None, typer.Option(help="trials in the study, in total")] = None,
    top_k_soup: Annotated[int | None, typer.Option(help="also average the k best trials into <output>/soup")] = None,
    resume: Annotated[bool, typer.Option(help="continue the study in the output folder")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder and its study")] = False,
) -> None:
    """Search SFT hyperparameters (Optuna TPE, median pruning); the best trial goes to <output>/best."""
    from lmforge import config as config_io
    from lmforge.finetune.search import TuneConfig, tune
    from lmforge.overrides import command_line

    flags = {
        "--trials": ("trials", trials),
        "--top-k-soup": ("top_k_soup", top_k_soup),
        "--resume": ("resume", resume),
        "--overwrite": ("overwrite", overwrite),
    }
    config, overrides = command_line(args, flags)
    cfg = config_io.resolve(config, TuneConfig, overrides)
    # A failed trial's exception is raised again after Optuna logs it with its traceback: report it once.
    logging.getLogger("optuna.study._optimize").addFilter(lambda record: not record.exc_info)
    try:
        results = tune(cfg)
    except KeyboardInterrupt:
        study = Path(cfg.study) if cfg.study else Path(cfg.output) / "study.db"
        if not study.is_file():
            raise
        kept = [o for o in overrides if o.partition("=")[0] not in ("resume", "overwrite")]
        again = shlex.join(["lmforge", "tune", *([config] if config else []), *kept, "--resume"])
        print(
            f"lmforge: interrupted: the study in {study} is kept (the interrupted trial will run again from its "
            f"start, not from its checkpoint); continue it with: {again}",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
    console.print(f"best trial {results.best_trial} (val_loss {results.best_value:.4f}) in {results.best}")


@app.command("export")
def export_command(
    model: Annotated[str, typer.Argument(help="'default', a model or LoRA adapter folder, a .gguf file or a hub id")],
    gguf: Annotated[Path, typer.Option("--gguf", help="GGUF file to write (for llama.cpp, Ollama)")],
    type: Annotated[str, typer.Option("--type", help="f16 | q8_0")] = "f16",
    overwrite: Annotated[bool, typer.Option(help="replace an existing file")] = False,
) -> None:
    """Write a llama model as one GGUF file, tokenizer and chat template included (adapters merged first)."""
    from lmforge.models.gguf_export import export_gguf

    path = export_gguf(model, gguf, type, overwrite=overwrite)
    console.print(f"wrote {path} ({type}, {path.stat().st_size / 2**20:.1f} MiB)")


app.command("distill")(distill_command)
app.command("merge")(merge_command)
app.command("moe")(moe_command)
app.command("run")(run_command)
app.command("demo")(demo_command)
app.command("compare")(compare_command)


@app.command("tasks")
def tasks_command() -> None:
    """List the built-in tasks."""
    from rich.table import Table

    from lmforge.eval.tasks import TASKS

    table = Table(title="built-in tasks")
    for column in ("task", "kind", "records", "what it measures"):
        table.add_column(column)
    for name, item in TASKS.items():
        table.add_row(name, item.kind, str(len(item.docs())), item.description)
    console.print(table)


@data_app.command("export")
def data_export(
    task: Annotated[str, typer.Argument(help="built-in task name (see `lmforge tasks`)")],
    split: Annotated[str, typer.Option(help="train | test")] = "train",
    out: Annotated[Path | None, typer.Option(help="jsonl file to write (default TASK-SPLIT.jsonl)")] = None,
    noise: Annotated[float, typer.Option(help="give this share of records another record's answer (seeded)")] = 0.0,
) -> None:
    """Write a built-in task's split as jsonl (prompt/answer records)."""
    from lmforge.data.synthetic import export_jsonl

    path = out or Path(f"{task}-{split}.jsonl")
    count = export_jsonl(task, split, path, noise)
    console.print(f"wrote {count} records to {path}" + (f" ({noise:.0%} with wrong answers)" if noise else ""))


@data_app.command("filter")
def data_filter(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key=value ...]")] = None,
    data: Annotated[str | None, typer.Option(help="data file or folder of prompt/completion records")] = None,
    task: Annotated[str | None, typer.Option(help="a built-in task's train split instead of --data")] = None,
    out: Annotated[str | None, typer.Option(help="output folder: kept.jsonl, dropped.jsonl, reasons.csv")] = None,
    model: Annotated[str | None, typer.Option(help="model that scores IFD and NLL (default: 'default')")] = None,
    verify: Annotated[str | None, typer.Option(help="built-in task whose exact answers completions must equal")] = None,
    ifd_max: Annotated[float | None, typer.Option(help="largest IFD kept (default 1.0)")] = None,
    nll_max: Annotated[float | None, typer.Option(help="largest mean NLL per answer token kept, nats")] = None,
    keep_fraction: Annotated[float | None, typer.Option(help="keep this share of the survivors (see keep_by)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
) -> None:
    """Drop records by IFD, model NLL, exact answers, repetition and truncation; print why each went."""
    from lmforge.data.filter import filter_data, print_reasons
    from lmforge.overrides import command_line

    flags = {
        "--data": ("data", data),
        "--task": ("task", task),
        "--out": ("output", out),
        "--model": ("model", model),
        "--verify": ("verify", verify),
        "--ifd-max": ("ifd_max", ifd_max),
        "--nll-max": ("nll_max", nll_max),
        "--keep-fraction": ("keep_fraction", keep_fraction),
        "--overwrite": ("overwrite", overwrite),
    }
    result = filter_data(*command_line(args, flags))
    print_reasons(result, console)
    console.print(f"kept records in {result.output / 'kept.jsonl'}; dropped ones and why in {result.output}")


@data_app.command("preview")
def data_preview(
    path: Annotated[Path, typer.Argument(help="data file or folder")],
    format: Annotated[str | None, typer.Option("--format", help="force a format instead of detecting it")] = None,
    columns: Annotated[str | None, typer.Option(help="key mapping, e.g. prompt=question,completion=answer")] = None,
    model: Annotated[str | None, typer.Option(help="render with this model's tokenizer and show the loss mask")] = None,
) -> None:
    """Detect a data file's format, count its records and show how the first one is trained."""
    from lmforge.data.sources import load_records

    records = load_records(path, fmt=format, columns=parse_columns(columns))
    console.print(f"{path}: {len(records)} records, format {records[0]['format']}")
    console.print(records[0])
    if model:
        from rich.text import Text

        from lmforge.data.chat import mask_runs, render_example
        from lmforge.models.load import load_model

        tokenizer = load_model(model).tokenizer
        runs = mask_runs(tokenizer, render_example(tokenizer, records[0]))
        if console.is_terminal:
            console.print("rendered ([green]trained[/green], [dim]masked[/dim]):")
            console.print(Text.assemble(*((text, "green" if trained else "dim") for text, trained in runs)))
        else:  # piped: colours are dropped, so the trained text is marked in the text itself
            console.print("rendered (trained text between ⟦ and ⟧, the rest masked):", highlight=False)
            plain = "".join(f"⟦{text}⟧" if trained else text for text, trained in runs)
            console.print(plain, markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: run the app, turning user errors into one line."""
    logs.configure()
    try:
        app()
    except UserError as err:
        print(f"lmforge: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        _close_process_group()
        gc.freeze()  # exit without the final collection over torch's objects: 0.3-0.4 s of every command


def _close_process_group() -> None:
    """Under torchrun, leave the process group before exiting: gloo aborts a process that exits inside one."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    main()
