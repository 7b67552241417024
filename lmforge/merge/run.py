"""`lmforge merge`: a mergekit config in, a complete model folder out.

Reads top to bottom: parse and check the config, rewrite lmforge's own methods into mergekit ones
(block_expansion -> passthrough slices, greedy_soup -> linear over the kept models, weight_search ->
task_arithmetic with the best weights), resolve every model reference (`MODEL+ADAPTER` and bare PEFT
adapter folders are merged into their base once and cached), plan every output tensor, build the output
tokenizer when `tokenizer_source` asks for one, then stream the merge into a staging folder with
config.json, tokenizer, generation config, lmforge.yaml (the config that was executed: mergekit can run it
too), run.json and a model card; optionally score inputs and output.
The folder appears whole or not at all.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge import config as config_io
from lmforge.cache import cache_dir
from lmforge.errors import UserError
from lmforge.merge import config as merge_config
from lmforge.merge import engine, expand, plan
from lmforge.merge import vocab as vocab_io
from lmforge.merge.methods import METHODS, REQUIRED
from lmforge.models.compat import checkpointing_rename_quiet
from lmforge.models.load import adapter_base, resolve_model
from lmforge.outputs import CardTable, model_card, staged_output, write_run_files
from lmforge.report.record import RunMeter, run_record

log = logging.getLogger("lmforge.merge")
OPTIONS = {"seed": 0, "eval_limit": 50, "progress": True, "num_threads": None}
_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def merge(
    config: str | Path | dict | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    explain: bool = False,
    eval_tasks: Sequence[str] = (),
    out_shard_size: str | int = "5GB",
    allow_nonfinite: bool = False,
    overrides: Sequence[str] = (),
    **options: Any,
) -> Path:
    """Merge models as a mergekit YAML (path or parsed dict) says, into the model folder `out`.

    `merge("merge.yaml", "out")`, `merge({"merge_method": "linear", "models": [...]}, "out")`, or the
    mergekit keys as keyword arguments: `merge(out="out", merge_method="linear", models=[...])`.

    Args:
        config: mergekit configuration: a YAML file or its parsed dict (None: the keys come as keywords).
        out: output model folder; refused if it exists, unless `overwrite`.
        explain: print each output tensor's inputs and resolved parameters, and stop (nothing is written).
        eval_tasks: tasks to score the inputs and the output on (model card and run.json).
        out_shard_size: largest output shard, bytes or "500MB" / "5GB".
        allow_nonfinite: write tensors holding NaN/Inf instead of stopping.
        overrides: "key.sub=value" strings over the mergekit config, as for the other commands.
        options: seed (random methods, default 0; `random_seed` is accepted too), eval_limit (records per
            task, 50), progress (bar on the terminal), num_threads (worker threads, default 2); any other
            name is a mergekit key (merge_method, models, base_model, parameters, dtype, ...).
    Returns:
        The output folder (with `explain`, the folder that would have been written).
    """
    if out is None:
        raise TypeError("merge() needs out, the output model folder")
    keys = {k: options.pop(k) for k in list(options) if k not in OPTIONS and k != "random_seed"}
    unknown = sorted(set(keys) - set(merge_config.TOP_KEYS))
    if unknown:
        raise UserError(
            f"unknown merge option(s) {unknown}: options are {', '.join(OPTIONS)}; mergekit keys are "
            + ", ".join(merge_config.TOP_KEYS)
        )
    if config is None or overrides or keys:
        config = config_io.as_mapping(config, overrides, **keys)
    if "random_seed" in options:
        options["seed"] = options.pop("random_seed")
    opts = OPTIONS | {k: v for k, v in options.items() if v is not None}
    meter, out = RunMeter(), Path(out)
    shard_bytes = parse_size(out_shard_size)
    cfg = merge_config.read(config)
    if out.exists() and not overwrite and not explain:
        raise UserError(f"output folder {out} exists: pass --overwrite or choose another folder")
    _check_required(cfg)  # before an adapter is merged, a model loaded or a bar drawn
    models = [plan.open_model(ref, resolve_input(ref)) for ref in cfg.referenced()]
    executed, soup_log = _executed(cfg, models, explain, opts["eval_limit"])
    models = [next(m for m in models if m.ref == ref) for ref in executed.referenced()]
    output = plan.build(executed, models)
    vocabulary = None
    if executed.tokenizer_source:
        vocabulary = vocab_io.build(executed.tokenizer_source, models, output.donor)
        for p in output.tensors:
            if p.vocab:
                p.shape = (vocabulary.size, *p.shape[1:])
    if explain:
        _print_explain(output, models, executed)
        return out
    template = _chat_template(executed.chat_template, models)
    threads = torch.get_num_threads()
    # Parallel over tensors, not inside them: OpenMP threads that spin-wait on a shared CPU made the merge
    # 7x slower (measured, 2 cores under load), while worker threads with single-threaded torch never spin.
    torch.set_num_threads(1)
    try:
        with staged_output(out, overwrite=overwrite) as staging:
            stats = engine.run(
                output.tensors,
                models,
                METHODS[executed.merge_method],
                staging,
                shard_bytes=shard_bytes,
                seed=int(opts["seed"]),
                allow_nonfinite=allow_nonfinite,
                vocabulary=vocabulary,
                progress=bool(opts["progress"]),
                workers=int(opts["num_threads"] or min(2, os.cpu_count() or 1)),
            )
            _write_config(staging, models[output.donor], executed, output, vocabulary)
            _write_tokenizer(staging, models[output.donor], vocabulary, template)
            scores, input_scores = (
                _evaluate(staging, models, list(eval_tasks), opts["eval_limit"]) if eval_tasks else ({}, {})
            )
            record = run_record(
                "merge",
                cfg.merge_method,
                meter,
                inputs={
                    "models": [{"ref": m.ref, "folder": str(m.folder), "fingerprint": fingerprint(m)} for m in models]
                },
                config={"merge": cfg.raw, "executed": executed.raw, "options": opts | {"out_shard_size": shard_bytes}},
                tokens_seen=0,
                params_total=sum(_numel(p.shape) for p in output.tensors if p.floating),
                size_bytes=sum(f.stat().st_size for f in staging.glob("*.safetensors")),
                metrics=scores,
            )
            record["input_metrics"] = input_scores
            record["merge_stats"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in vars(stats).items()}
            if soup_log is not None:
                record["search" if cfg.merge_method == "weight_search" else "soup"] = soup_log
            card = _model_card(out, cfg, executed.raw, models, scores, input_scores, soup_log)
            write_run_files(staging, executed.raw, record, card)
    finally:
        torch.set_num_threads(threads)
    return out


def _executed(cfg: merge_config.MergeConfig, models: list[plan.InputModel], explain: bool, limit: int):
    """The mergekit config that runs: lmforge's own methods rewritten into mergekit ones (and the soup's or the
    search's log)."""
    if cfg.merge_method == "block_expansion":
        return merge_config.read(expand.to_passthrough(cfg, models[0].layers)), None
    if cfg.merge_method not in ("greedy_soup", "weight_search"):
        return cfg, None
    from lmforge.merge import search, soup  # import the evaluation harness (transformers): only when needed

    refs = [s.model for s in cfg.models or ()]
    if cfg.merge_method == "weight_search":
        everyone, choose = search.task_arithmetic(cfg, refs, [1.0] * len(refs)), search.choose
    else:
        everyone, choose = soup.uniform(cfg, refs), soup.choose
    everyone = merge_config.read(everyone)
    plan.build(everyone, models)  # incompatible candidates fail here, before any evaluation
    if explain:
        return everyone, None
    chosen, log_rows = choose(cfg, models, limit)
    return merge_config.read(chosen), log_rows


def parse_size(value: str | int) -> int:
    """Shard size in bytes: 123, '500MB', '5GB', '1.5G', or mergekit's '5B' (5 billion; its writer counts bytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(kb?|mb?|gb?|tb?|b)?\s*", str(value), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--out-shard-size '{value}' is not a size: write e.g. 5GB or 500MB")
    unit = (match.group(2) or "").lower()
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "b": 10**9}[unit[:1] if unit != "b" else "b"]
    return int(float(match.group(1)) * scale)


def resolve_input(ref: str) -> Path:
    """A model reference -> a folder of safetensors; `BASE+ADAPTER` (or an adapter folder) is merged once."""
    if "+" in ref and not Path(ref).exists():
        base_ref, adapter = ref.rsplit("+", 1)
        return _merged_adapter(resolve_model(base_ref), Path(adapter), ref)
    folder = resolve_model(ref)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        # the base is found as load_model finds it; a base that is itself an adapter is merged first
        return _merged_adapter(resolve_input(str(adapter_base(folder))), folder, ref)
    return folder


def _merged_adapter(base: Path, adapter: Path, ref: str) -> Path:
    """Base weights with the PEFT adapter merged in, cached under LMFORGE_CACHE keyed by both contents."""
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"'{ref}': {adapter} is not a PEFT adapter folder (no adapter_config.json)")
    digest = hashlib.sha256()
    for folder in (base, adapter):
        for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
            digest.update(
                file.name.encode() + str(file.stat().st_size).encode() + str(file.stat().st_mtime_ns).encode()
            )
    target = cache_dir() / "merged_adapters" / f"{adapter.resolve().name}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("merging adapter %s into %s once (cached in %s)", adapter, base, target)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True)
    with checkpointing_rename_quiet():  # PEFT reads transformers' deprecated is_gradient_checkpointing
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    tokenizer_home = adapter if (adapter / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tokenizer_home).save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process wrote it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fingerprint(model: plan.InputModel) -> str:
    """A cheap content fingerprint: every shard's header and size (headers hold names, shapes, offsets)."""
    digest = hashlib.sha256()
    for file in sorted({info.file for info in model.index.values()}):
        with open(file, "rb") as handle:
            digest.update(handle.read(8 + int.from_bytes(handle.read(8), "little")))
        digest.update(str(file.stat().st_size).encode())
    return "safetensors-header-sha256:" + digest.hexdigest()[:16]


def _numel(shape) -> int:
    count = 1
    for s in shape:
        count *= s
    return count


def _check_required(cfg: merge_config.MergeConfig) -> None:
    """A required method parameter that no model, slice or top-level entry sets is named before any input is
    resolved (the planner, which needs the models' tensors, would name it per tensor only afterwards)."""
    if cfg.merge_method not in METHODS:  # lmforge's own methods are rewritten first, then planned
        return
    slices = cfg.slices or ()
    anywhere = set(cfg.parameters).union(*(s.parameters for s in slices))
    sources = list(cfg.models or ()) + [source for s in slices for source in s.sources]
    bases = {cfg.base_model} | {s.base_model for s in slices}
    for param in METHODS[cfg.merge_method].params:
        if param.default is not REQUIRED or param.name in anywhere:
            continue
        if param.scope == "shared":
            lacking = ["every tensor"]
        else:
            needing = [s for s in sources if param.scope == "input" or s.model not in bases]
            lacking = [s.model for s in needing if param.name not in s.parameters]
        if lacking:
            raise UserError(
                f"{cfg.where}: missing parameter '{param.name}' for {lacking[0]}: set it in that model's "
                "parameters or in the top-level parameters"
            )


def _print_explain(output: plan.Plan, models: list[plan.InputModel], cfg: merge_config.MergeConfig) -> None:
    from rich.table import Table

    from lmforge.report.tables import table_console

    table = Table(title=f"{cfg.merge_method}: {len(output.tensors)} output tensors, {output.layers} layers (* = base)")
    for column in ("tensor", "t", "inputs", "shared parameters", "per-input parameters"):
        table.add_column(column)
    for row in plan.explain(output, models, cfg.merge_method):
        table.add_row(*row)
    table_console().print(table)


def _chat_template(choice: str | None, models: list[plan.InputModel]) -> str | None:
    """mergekit's chat_template: 'auto' (the most common among the inputs), 'chatml', or the template text."""
    if not choice:
        return None
    if choice == "auto":
        found = [t.strip() for m in models if (t := _template_of(m.folder))]
        return collections.Counter(found).most_common(1)[0][0] if found else None
    if choice == "chatml":
        from lmforge.models.tiny import CHATML_TEMPLATE

        return CHATML_TEMPLATE
    if "{" not in choice:
        raise UserError(
            f"chat_template '{choice}': lmforge bundles only 'chatml' and 'auto'; paste the Jinja template text"
        )
    return choice


def _template_of(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def _write_config(staging: Path, donor: plan.InputModel, cfg, output: plan.Plan, vocabulary) -> None:
    """The donor's config.json with the layer count, dtype and vocabulary size of the output."""
    config = dict(donor.config)
    if "num_hidden_layers" in config or cfg.slices:
        config["num_hidden_layers"] = output.layers
    dtype = cfg.out_dtype or cfg.dtype
    if dtype:
        config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype
    if vocabulary is not None:
        config["vocab_size"] = vocabulary.size
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation = donor.folder / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, staging / "generation_config.json")


def _write_tokenizer(staging: Path, donor: plan.InputModel, vocabulary, template: str | None) -> None:
    """The built tokenizer, or the donor's tokenizer files as they are; the chat template set on top."""
    if vocabulary is None and template is None:
        for name in _TOKENIZER_FILES:
            if (donor.folder / name).is_file():
                shutil.copy(donor.folder / name, staging / name)
        return
    if vocabulary is not None:
        tokenizer = vocabulary.tokenizer
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(donor.folder)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(staging)


def _evaluate(staging: Path, models, tasks: list[str], limit: int) -> tuple[dict, dict]:
    from lmforge.eval.run import evaluate, metrics_of

    inputs = {m.ref: metrics_of(evaluate(str(m.folder), tasks, limit=limit, footprint=False)) for m in models}
    return metrics_of(evaluate(str(staging), tasks, limit=limit, footprint=False)), inputs


def _model_card(out: Path, cfg, resolved: dict, models, scores: dict, input_scores: dict, soup_log) -> str:
    method = cfg.merge_method
    reference = METHODS[method].reference if method in METHODS else ""
    sentence = f"Merged by lmforge with `{method}`" + (f" ({reference})" if reference else "") + " from:"
    sections: list = [[f"- `{m.ref}`" for m in models]]
    if soup_log and method == "weight_search":
        from lmforge.merge import search

        sections.append(search.card_lines(soup_log))
    elif soup_log:
        rows = [
            [r["model"], f"{r['score']:.4f}", f"{r['soup_score']:.4f}", "yes" if r["kept"] else "no"] for r in soup_log
        ]
        caption = "Greedy soup (candidates best first; kept only when the soup improved):"
        sections.append(CardTable(["model", "alone", "soup with it", "kept"], rows, caption))
    if scores:
        names = [m.ref for m in models]
        rows = [
            [task, metric, *(f"{input_scores[n][task][metric]['value']:.4f}" for n in names), f"{cell['value']:.4f}"]
            for task, metrics in scores.items()
            for metric, cell in metrics.items()
        ]
        sections.append(CardTable(["task", "metric", *names, "merged"], rows))
    recipe = config_io.to_yaml(resolved).rstrip()
    sections.append(["## Recipe (lmforge.yaml, mergekit syntax)", "", "```yaml", recipe, "```"])
    return model_card(out.name, sentence, sections, note="Costs and scores are in run.json.")
