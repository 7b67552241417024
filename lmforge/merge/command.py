"""The `lmforge merge` verb: `lmforge merge CONFIG.yaml OUT`, or flags for the common case.

`lmforge merge --method ties --base B A1 A2 --density 0.5 --weight 0.5 OUT` builds the mergekit config the
flags describe (one --weight/--density for all models, or one per model) and runs it like a file.
mergekit's `mergekit-yaml` flags are accepted so its command lines run: --random-seed, --num-threads,
--out-shard-size and --quiet act; --copy-tokenizer, --write-model-card, --safe-serialization and
--lora-merge-dtype float32 describe what lmforge always does; a flag whose opposite would change the
output (--no-copy-tokenizer, --trust-remote-code, ...) is refused; every other one prints one line
saying why it changes nothing here (NO_EFFECT; mergekit's meanings are in its options.py help).
Imports stay inside the function so `lmforge --help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.errors import UserError

_MERGEKIT = "mergekit flag: prints why it changes nothing here, or refuses"

# mergekit flags with no lmforge counterpart (parameter name -> flag, why the merge is the same without it).
NO_EFFECT = {
    "lazy_unpickle": ("--lazy-unpickle", "lmforge reads safetensors only and never unpickles a checkpoint"),
    "allow_crimes": ("--allow-crimes", "lmforge merges models of one architecture only and still refuses mixed ones"),
    "cuda": ("--cuda", "the merge runs on the CPU (only --eval and greedy_soup/weight_search scoring use a GPU)"),
    "low_cpu_memory": (
        "--low-cpu-memory",
        "nothing is kept on a GPU, and the engine already streams tensor by tensor (RAM ~ the tensors in flight)",
    ),
    "clone_tensors": (
        "--clone-tensors",
        "each output tensor is written from its own buffer, so a layer used twice is stored twice anyway",
    ),
    "read_to_gpu": ("--read-to-gpu", "weights are read into CPU memory, where the merge runs"),
    "multi_gpu": ("--multi-gpu", "the merge uses no GPU; its parallelism is --num-threads worker threads"),
    "gpu_rich": (
        "--gpu-rich",
        "it stands for --cuda --low-cpu-memory --read-to-gpu --multi-gpu; the merge runs on the CPU",
    ),
    "async_write": (
        "--async-write",
        "each worker thread already writes its tensor as soon as it is merged, while the others read and compute",
    ),
    "write_threads": ("--write-threads", "the --num-threads workers do the writing: set --num-threads"),
    "device": ("--device", "the merge runs on the CPU"),
    "lora_merge_cache": (
        "--lora-merge-cache",
        "adapters are merged once into $LMFORGE_CACHE/merged_adapters: set LMFORGE_CACHE to move that cache",
    ),
    "transformers_cache": (
        "--transformers-cache",
        "hub models download into the Hugging Face cache: set HF_HUB_CACHE (or HF_HOME) to move it",
    ),
    "verbose": ("-v", "lmforge already prints its progress messages; there is no more detailed merge log"),
}
# mergekit flags whose setting would change what lmforge writes (parameter name -> the refusal).
REFUSED = {
    "trust_remote_code": "--trust-remote-code: lmforge merges safetensors only and never runs model code; drop "
    "the flag",
    "copy_tokenizer": "--no-copy-tokenizer: lmforge always writes the output's tokenizer (evaluation and loading need "
    "it); drop the flag",
    "write_model_card": "--no-write-model-card: lmforge always writes README.md (the model card with the executed "
    "config); drop the flag, or delete README.md afterwards",
    "safe_serialization": "--no-safe-serialization: lmforge writes safetensors only, never pickled .bin files; drop "
    "the flag",
    "lora_merge_dtype": "--lora-merge-dtype {}: lmforge applies adapters in float32 only (dtype/out_dtype in the "
    "config set the output's); drop the flag or pass float32",
}


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
    lazy_unpickle: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    copy_tokenizer: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = True,
    allow_crimes: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    cuda: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    low_cpu_memory: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    write_model_card: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = True,
    safe_serialization: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = True,
    clone_tensors: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    trust_remote_code: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    read_to_gpu: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    multi_gpu: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    gpu_rich: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    async_write: Annotated[bool, typer.Option(hidden=True, help=_MERGEKIT)] = False,
    write_threads: Annotated[int | None, typer.Option(hidden=True, help=_MERGEKIT)] = None,
    device: Annotated[str | None, typer.Option(hidden=True, help=_MERGEKIT)] = None,
    lora_merge_cache: Annotated[str | None, typer.Option(hidden=True, help=_MERGEKIT)] = None,
    lora_merge_dtype: Annotated[str | None, typer.Option(hidden=True, help=_MERGEKIT)] = None,
    transformers_cache: Annotated[str | None, typer.Option(hidden=True, help=_MERGEKIT)] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, hidden=True, help=_MERGEKIT)] = 0,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Merge models: a mergekit YAML (unchanged), or --method with models as arguments."""
    given = {name: value for name, value in locals().items() if name in NO_EFFECT or name in REFUSED}  # parameters
    for line in mergekit_flags(given):
        typer.echo(f"lmforge: {line}", err=True)
    from rich.console import Console

    from lmforge.merge.run import merge

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


def mergekit_flags(values: dict) -> list[str]:
    """One line per mergekit flag given that changes nothing here; a UserError for one that would change the output.

    Args:
        values: the flags' values by parameter name (defaults mean "not given").
    """
    if values.get("trust_remote_code"):
        raise UserError(REFUSED["trust_remote_code"])
    for name in ("copy_tokenizer", "write_model_card", "safe_serialization"):
        if values.get(name) is False:
            raise UserError(REFUSED[name])
    dtype = values.get("lora_merge_dtype")
    if dtype is not None and str(dtype).removeprefix("torch.") != "float32":
        raise UserError(REFUSED["lora_merge_dtype"].format(dtype))
    given = [name for name in NO_EFFECT if values.get(name) not in (None, False, 0)]
    return [f"{NO_EFFECT[name][0]} has no effect: {NO_EFFECT[name][1]}" for name in given]


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
        name, parsed = key.strip(), yaml.safe_load(value)
        if name in top and top[name] != parsed:
            given = f"--{name} {top[name]}" if name == "t" and t is not None else f"another --param {name}"
            raise UserError(f"--param '{item}' and {given} set {name} to different values: give only one of them")
        top[name] = parsed
    config = {"merge_method": method, "models": entries}
    if base:
        config["base_model"] = base
    if top:
        config["parameters"] = top
    if dtype:
        config["dtype"] = dtype
    return config
