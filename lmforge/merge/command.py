"""The `lmforge merge` verb: `lmforge merge CONFIG.yaml OUT`, or flags for the common case.

`lmforge merge --method ties --base B A1 A2 --density 0.5 --weight 0.5 OUT` builds the mergekit config the
flags describe (one --weight/--density for all models, or one per model) and runs it like a file.
mergekit's `mergekit-yaml` flags are accepted so its command lines work: --random-seed and --num-threads
act; the others (--lazy-unpickle, --copy-tokenizer, --allow-crimes, --cuda, ...) change nothing here.
Imports stay inside the function so `lmforge --help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.errors import UserError

_NO_OP = "accepted for mergekit compatibility; no effect"


def merge_command(
    args: Annotated[list[str], typer.Argument(help="CONFIG.yaml OUT, or with --method: MODEL... OUT")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    explain: Annotated[
        bool, typer.Option(help="print each output tensor's resolved parameters; write nothing")
    ] = False,
    eval: Annotated[list[str] | None, typer.Option("--eval", help="score inputs and output on TASK; repeat")] = None,
    eval_limit: Annotated[int, typer.Option(help="records scored per task")] = 50,
    out_shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 5GB or 500MB")] = "5GB",
    allow_nonfinite: Annotated[bool, typer.Option(help="write NaN/Inf tensors instead of stopping")] = False,
    method: Annotated[str | None, typer.Option(help="merge method (flag form: models are the arguments)")] = None,
    base: Annotated[str | None, typer.Option(help="base model (flag form)")] = None,
    weight: Annotated[list[float] | None, typer.Option(help="weight: one for all models, or one per model")] = None,
    density: Annotated[list[float] | None, typer.Option(help="density: one for all models, or one per model")] = None,
    t: Annotated[float | None, typer.Option("--t", help="interpolation factor (slerp, nearswap)")] = None,
    param: Annotated[list[str] | None, typer.Option(help="other top-level parameter NAME=VALUE; repeat")] = None,
    dtype: Annotated[str | None, typer.Option(help="output dtype (flag form)")] = None,
    random_seed: Annotated[int, typer.Option(help="seed of the random methods (dare, della)")] = 0,
    num_threads: Annotated[int | None, typer.Option(help="worker threads (default 2)")] = None,
    lazy_unpickle: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    copy_tokenizer: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = True,
    allow_crimes: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    cuda: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    low_cpu_memory: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    write_model_card: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = True,
    safe_serialization: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = True,
    clone_tensors: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    trust_remote_code: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    read_to_gpu: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    multi_gpu: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    gpu_rich: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    async_write: Annotated[bool, typer.Option(hidden=True, help=_NO_OP)] = False,
    write_threads: Annotated[int, typer.Option(hidden=True, help=_NO_OP)] = 1,
    device: Annotated[str | None, typer.Option(hidden=True, help=_NO_OP)] = None,
    lora_merge_cache: Annotated[str | None, typer.Option(hidden=True, help=_NO_OP)] = None,
    lora_merge_dtype: Annotated[str | None, typer.Option(hidden=True, help=_NO_OP)] = None,
    transformers_cache: Annotated[str | None, typer.Option(hidden=True, help=_NO_OP)] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, hidden=True, help=_NO_OP)] = 0,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Merge models: a mergekit YAML (unchanged), or --method with models as arguments."""
    from rich.console import Console

    from lmforge.merge.run import merge

    if trust_remote_code:
        raise UserError("--trust-remote-code: lmforge merges safetensors only and never runs model code; drop the flag")
    if method is None:
        if len(args) != 2 or not args[0].endswith((".yaml", ".yml")):
            raise UserError(
                "usage: lmforge merge CONFIG.yaml OUT, or lmforge merge --method NAME [--base B] MODEL... OUT"
            )
        config: str | dict = args[0]
    else:
        if len(args) < 2:
            raise UserError(
                "with --method, give the models then the output folder: lmforge merge --method ties A B OUT"
            )
        config = flags_config(method, base, args[:-1], weight, density, t, param, dtype)
    folder = merge(
        config,
        Path(args[-1]),
        overwrite=overwrite,
        explain=explain,
        eval_tasks=eval or (),
        out_shard_size=out_shard_size,
        allow_nonfinite=allow_nonfinite,
        seed=random_seed,
        eval_limit=eval_limit,
        num_threads=num_threads,
        progress=not quiet,
    )
    if not explain:
        Console().print(f"merged model in {folder}")


def flags_config(
    method: str,
    base: str | None,
    models: list[str],
    weight: list[float] | None,
    density: list[float] | None,
    t: float | None,
    params: list[str] | None,
    dtype: str | None,
) -> dict:
    """The mergekit config that the flag form describes."""
    import yaml

    entries = []
    for i, model in enumerate(models):
        own = {}
        for name, values in (("weight", weight), ("density", density)):
            if values and len(values) not in (1, len(models)):
                raise UserError(f"--{name}: give one value for all {len(models)} models or one per model")
            if values:
                own[name] = values[0] if len(values) == 1 else values[i]
        entries.append({"model": model} | ({"parameters": own} if own else {}))
    top: dict = {} if t is None else {"t": t}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param '{item}': write NAME=VALUE, e.g. --param normalize=false")
        top[key.strip()] = yaml.safe_load(value)
    config = {"merge_method": method, "models": entries}
    if base:
        config["base_model"] = base
    if top:
        config["parameters"] = top
    if dtype:
        config["dtype"] = dtype
    return config
