"""`lmforge eval`: score one model on tasks, measure its footprint, write results.json and run.json.

Reads top to bottom: resolve the tasks and their k-shot sources (a built-in task's train split, a user
file's --fewshot-file or records held out of it), all checked before the model loads; load the model; for
each task build requests from its records (k-shot prompts drawn seeded), run one of the three scoring
calls, reduce to metrics with a standard error, then measure the footprint. `results.json` follows
lm-eval's layout (results per task as "metric,filter" keys with "_stderr", configs, versions, n-shot,
n-samples, config) so tools that read lm-eval output read ours; per-sample inputs and answers go to
samples_<task>.jsonl.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge import config as config_io
from lmforge.data.chat import chat_prompt
from lmforge.errors import UserError
from lmforge.eval import fusion as fusion_io
from lmforge.eval import lmeval_score, lmeval_yaml, scoring
from lmforge.eval.speed import measure_footprint, size_on_disk
from lmforge.eval.tasks import FEWSHOT_SEED, Task, get_task
from lmforge.models.load import LoadedModel, file_sha256, load_model
from lmforge.outputs import staged_output
from lmforge.report.record import RunMeter, run_record, versions, write_json

log = logging.getLogger("lmforge.eval")
# Longest perplexity window: the model's context, capped so attention stays affordable on a CPU. lm-eval uses the
# full context; for texts longer than this pass it max_length=MAX_WINDOW to compare (docs/footguns.md).
MAX_WINDOW = 2048


@dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` takes, as a config: the same keys as its arguments."""

    model: str | list[str]
    """Model reference: default, a folder, a .gguf file or a hub id; a list of them with `fuse`."""
    tasks: list[str]
    """Built-in task names, .jsonl task files or lm-eval task .yaml files."""
    limit: int | None = None
    """Score only the first N records of each task."""
    num_fewshot: int = 0
    """k example turns before each prompt."""
    batch_size: int = 8
    """Requests per forward pass."""
    footprint: bool = True
    """Measure size, speed and memory."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the model is loaded in."""
    fewshot_file: str | None = None
    """A .jsonl of shots for the .jsonl tasks."""
    columns: dict[str, str] | None = None
    """Rename the .jsonl task files' keys: {prompt: question, answer: solution}."""
    apply_chat_template: bool = False
    """Render task-YAML prompts through the model's chat template (lm-eval's --apply_chat_template)."""
    system_instruction: str | None = None
    """System prompt for task-YAML prompts (lm-eval's --system_instruction)."""
    fuse: Literal["ensemble", "product", "dexperts", "contrastive"] | None = None
    """Fuse the models of `model` at generation time (eval/fusion.py) and score them as one."""
    fuse_weights: list[float] | None = None
    """ensemble/product: one weight per model (default equal)."""
    fuse_alpha: float | None = None
    """dexperts: scale of (tuned - untuned), default 1; contrastive: plausibility cut-off, default 0.1."""

    def __post_init__(self) -> None:
        config_io.require(bool(self.tasks), "tasks", "is empty: name a task (see `lmforge tasks`)")
        config_io.at_least(self, "limit", 1)
        config_io.at_least(self, "num_fewshot", 0)
        config_io.at_least(self, "batch_size", 1)


def evaluate(
    model: str | list[str] | LoadedModel | Path | Mapping[str, Any] | EvalConfig,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | None = None,
    footprint: bool | None = None,
    dtype: str | None = None,
    fewshot_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    columns: dict[str, str] | None = None,
    apply_chat_template: bool | None = None,
    system_instruction: str | None = None,
    fuse: str | None = None,
    fuse_weights: Sequence[float] | None = None,
    fuse_alpha: float | None = None,
) -> dict:
    """Score a model on tasks; returns an lm-eval-shaped results dict (plus "samples" and "footprint").

    `evaluate(model, tasks, limit=50)`, or one config with these keys: `evaluate("eval.yaml")`,
    `evaluate({"model": "default", "tasks": ["dates"]})` or an EvalConfig, with `overrides` ("limit=5") and
    any argument given besides applied over it. An argument left as None takes the config's value, else
    EvalConfig's default (num_fewshot 0, batch_size 8, footprint on, float32, no chat template).

    Args:
        model: a model reference (see models.load) or an already loaded model; or a config (a .yaml file,
            a dict or an EvalConfig).
        tasks: built-in task names or paths to .jsonl task files.
        limit: score only the first `limit` records of each task.
        num_fewshot: k example turns before each generate/multiple-choice prompt.
        fewshot_file: a .jsonl of shots for the .jsonl tasks (same shape as theirs); without it a .jsonl
            task holds k of its own records out as shots and does not score them.
        batch_size: requests per forward pass.
        footprint: also measure parameters, size, speed and memory.
        overrides: "key=value" strings over a config.
        columns: {canonical: their key} renaming of the .jsonl task files' keys (prompt, answer, choices, text).
        apply_chat_template: render lm-eval task YAML prompts (shots and question in one user turn) through the
            tokenizer's chat template with the generation prompt, as lm-eval does. Built-in and .jsonl
            generation tasks always use the chat template; this flag is for task YAMLs only.
        system_instruction: a system prompt for task YAMLs: a system turn with the chat template, else text
            before the description and shots (as lm-eval).
        fuse: score the models of `model` (a list) fused at generation time as one (eval/fusion.py):
            ensemble | product | dexperts (BASE TUNED UNTUNED) | contrastive (STRONG WEAK).
        fuse_weights: ensemble/product weights, one per model.
        fuse_alpha: dexperts' scale of (tuned - untuned), contrastive's plausibility cut-off.
    """
    is_config = isinstance(model, (Mapping, EvalConfig)) or str(model).endswith((".yaml", ".yml"))
    given = {
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "footprint": footprint,
        "dtype": dtype,
        "fewshot_file": None if fewshot_file is None else str(fewshot_file),
        "columns": columns,
        "apply_chat_template": apply_chat_template,
        "system_instruction": system_instruction,
        "fuse": fuse,
        "fuse_weights": None if fuse_weights is None else list(fuse_weights),
        "fuse_alpha": fuse_alpha,
    }
    given = {key: value for key, value in given.items() if value is not None}  # None: the config's value
    if is_config or (overrides and not isinstance(model, LoadedModel)):
        settings = given if is_config else {"model": model if isinstance(model, list) else str(model), **given}
        cfg = config_io.resolve(model if is_config else None, EvalConfig, overrides, **settings)
        return evaluate(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig)})
    if overrides:
        raise TypeError("overrides apply to a config (a .yaml file, a dict or an EvalConfig), not to a loaded model")
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}
    num_fewshot, batch_size, footprint, dtype, apply_chat_template = (
        given.get(key, defaults[key])
        for key in ("num_fewshot", "batch_size", "footprint", "dtype", "apply_chat_template")
    )
    if not tasks:
        raise UserError("no task given: pass --task NAME (see `lmforge tasks`)")
    if num_fewshot < 0 or batch_size < 1 or (limit is not None and limit < 1):
        raise UserError("--num-fewshot must be >= 0, --batch-size and --limit >= 1")
    if fewshot_file is not None and num_fewshot == 0:
        raise UserError(f"fewshot file {fewshot_file} given but -k is 0: pass -k N to use N shots per prompt")
    if fewshot_file is not None and not any(name.endswith(".jsonl") for name in tasks):
        raise UserError(
            f"fewshot file {fewshot_file} is for .jsonl tasks: built-in tasks take shots from their train split"
        )
    if columns and not any(name.endswith(".jsonl") for name in tasks):
        raise UserError("--columns renames the keys of .jsonl task files: name a .jsonl task, or drop --columns")
    if (apply_chat_template or system_instruction is not None) and not any(map(lmeval_yaml.is_task_yaml, tasks)):
        raise UserError(
            "--apply-chat-template and --system-instruction are for lm-eval task .yaml files: built-in and .jsonl "
            "generation tasks already use the model's chat template"
        )
    refs = list(model) if isinstance(model, (list, tuple)) else [str(model)]
    fusion = _fusion_of(fuse, refs, fuse_weights, fuse_alpha) if not isinstance(model, LoadedModel) else None
    # Unknown tasks, bad records, bad task YAMLs and too few shots all fail here, before the model loads.
    resolved = [
        get_task(name, num_fewshot, fewshot_file, columns if name.endswith(".jsonl") else None) for name in tasks
    ]
    for task in resolved:
        kind = task.extra.get("output_type") or _OUTPUT_TYPES[task.kind]
        if fusion and fusion.method == "contrastive" and kind != "generate_until":
            raise UserError(
                f"task {task.name} scores log-likelihoods, which contrastive decoding does not define (its cut-off "
                "gives tokens zero probability): score it with generation tasks only, or fuse another way"
            )
    for task in resolved:
        if task.held_out:
            log.info("%s: %d records held out as k-shot examples, not scored", task.name, task.held_out)
    if isinstance(model, LoadedModel):
        loaded = model
    elif fusion:
        loaded = fusion_io.load_fused(refs, fusion, dtype=dtype)
    else:
        loaded = load_model(refs[0], dtype=dtype)
    if apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        raise UserError(f"model {loaded.ref} has no chat template: drop --apply-chat-template")
    chat = {"apply_chat_template": apply_chat_template, "system_instruction": system_instruction}
    results: dict = {"results": {}, "configs": {}, "versions": {}, "n-shot": {}, "n-samples": {}, "samples": {}}
    for task in resolved:
        docs = task.docs()
        scored_docs = docs[:limit] if limit else docs
        log.info("scoring %s: %d records (%s)", task.name, len(scored_docs), task.kind)
        start = time.perf_counter()
        metrics, samples = score_task(loaded, task, scored_docs, num_fewshot, batch_size, **chat)
        shots = task.extra.get("num_fewshot", num_fewshot)
        results["results"][task.name] = {"alias": task.name, **metrics}
        results["configs"][task.name] = {
            "task": task.name,
            "output_type": task.extra.get("output_type") or _OUTPUT_TYPES[task.kind],
            "description": task.description,
            "num_fewshot": shots,
            "fewshot_source": task.shots_from if shots and task.kind != "perplexity" else "none",
            "fewshot_held_out": task.held_out,
            "stop": list(task.stop),
            "max_new_tokens": task.max_new_tokens,
            "seconds": round(time.perf_counter() - start, 2),
        }
        if "lmeval" in task.extra:
            spec = task.extra["lmeval"]
            results["configs"][task.name] |= {"stop": list(spec.until), "max_new_tokens": spec.max_gen_toks}
            results["configs"][task.name] |= {"yaml": str(spec.path), **spec.config, **chat}
        results["versions"][task.name] = task.version
        results["n-shot"][task.name] = shots if task.kind != "perplexity" else 0
        results["n-samples"][task.name] = {"original": len(docs), "effective": len(scored_docs)}
        results["samples"][task.name] = samples
    results["config"] = {
        "model": loaded.ref,
        "model_folder": str(loaded.folder),
        "batch_size": batch_size,
        "limit": limit,
        "dtype": dtype,
        "device": str(next(loaded.model.parameters()).device),
        "fewshot_seed": FEWSHOT_SEED,
    }
    fused = isinstance(loaded.model, fusion_io.FusedModel)
    if fused:
        rule = loaded.model.fusion
        members = [str(f) for f in loaded.model.folders]
        results["config"]["fuse"] = {
            "method": rule.method,
            "models": members,
            "weights": rule.weights,
            "alpha": rule.alpha,
        }
    results["lmforge_versions"] = versions()
    if footprint:
        log.info("measuring footprint (size, speed, memory)")
    results["footprint"] = measure_footprint(loaded) if footprint else None
    if footprint and fused:  # every member runs for every token: all parameters are active
        results["footprint"]["size_bytes"] = sum(size_on_disk(f) for f in loaded.model.folders)
        results["footprint"]["params_active"] = results["footprint"]["params_total"]
    return results


def _fusion_of(fuse: str | None, refs: list[str], weights, alpha) -> fusion_io.Fusion | None:
    """The checked fusion rule, None for one model; several models without a rule is a mistake."""
    if fuse is None and len(refs) > 1:
        raise UserError(f"{len(refs)} models given: fuse them with --fuse {'|'.join(fusion_io.FUSIONS)}, or name one")
    if fuse is None:
        if weights is not None or alpha is not None:
            raise UserError("fusion weights or alpha given without --fuse: add --fuse, or drop them")
        return None
    return fusion_io.check_fusion(fuse, len(refs), weights, alpha)


_OUTPUT_TYPES = {
    "generate": "generate_until",
    "multiple_choice": "multiple_choice",
    "perplexity": "loglikelihood_rolling",
}


def score_task(
    loaded: LoadedModel,
    task: Task,
    docs: list[dict],
    num_fewshot: int,
    batch_size: int,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
):
    """Metrics {"metric,filter": v, "metric_stderr,filter": s} and per-sample records for one task."""
    if "lmeval" in task.extra:  # an lm-eval task YAML scores itself, prompts and filters as lm-eval builds them
        window = min(getattr(loaded.model.config, "max_position_embeddings", None) or MAX_WINDOW, MAX_WINDOW)
        return lmeval_score.score(
            loaded, task.extra["lmeval"], docs, batch_size, apply_chat_template, system_instruction, window
        )
    if task.kind == "perplexity":
        return _score_perplexity(loaded, docs, batch_size)
    shots = _fewshot_source(task, num_fewshot)
    rng = random.Random(FEWSHOT_SEED)
    if task.kind == "generate":
        prompts = [chat_prompt(loaded.tokenizer, doc["prompt"], _draw(rng, shots, num_fewshot)) for doc in docs]
        answers = scoring.generate_until(
            loaded.model, loaded.tokenizer, prompts, task.stop, task.max_new_tokens, batch_size
        )
        hits = [float(answer.strip() == doc["answer"].strip()) for answer, doc in zip(answers, docs, strict=True)]
        samples = [
            {"prompt": doc["prompt"], "input": text, "target": doc["answer"], "output": out, "exact_match": hit}
            for doc, text, out, hit in zip(docs, prompts, answers, hits, strict=True)
        ]
        return _mean_metric("exact_match", hits), samples
    return _score_multiple_choice(loaded, docs, shots, num_fewshot, rng, batch_size)


def _fewshot_source(task: Task, num_fewshot: int) -> list[dict]:
    """The task's shots; get_task already checked there are at least `num_fewshot`."""
    return task.shots() if num_fewshot and task.shots else []


def _draw(rng: random.Random, shots: list[dict], k: int) -> list[tuple[str, str]]:
    """k (prompt, answer text) example pairs; a multiple-choice shot shows its right choice, not its index."""
    chosen = rng.sample(shots, k) if k else []
    return [
        (shot["prompt"], shot["choices"][shot["answer"]] if "choices" in shot else shot["answer"]) for shot in chosen
    ]


def _score_multiple_choice(loaded, docs, shots, num_fewshot, rng, batch_size):
    """lm-eval's acc (highest log-likelihood) and acc_norm (log-likelihood per byte of the choice)."""
    requests, owners, contexts = [], [], []
    for index, doc in enumerate(docs):
        prefix = "".join(f"{p}\n{a}\n\n" for p, a in _draw(rng, shots, num_fewshot))
        contexts.append(f"{prefix}{doc['prompt']}\n")
        for choice in doc["choices"]:
            requests.append((contexts[-1], choice))
            owners.append(index)
    scores = scoring.loglikelihood(loaded.model, loaded.tokenizer, requests, batch_size)
    acc, acc_norm, samples = [], [], []
    for index, doc in enumerate(docs):
        lls = [score for owner, (score, _) in zip(owners, scores, strict=True) if owner == index]
        normed = [ll / max(len(choice.encode()), 1) for ll, choice in zip(lls, doc["choices"], strict=True)]
        pick, pick_norm = lls.index(max(lls)), normed.index(max(normed))
        acc.append(float(pick == doc["answer"]))
        acc_norm.append(float(pick_norm == doc["answer"]))
        samples.append(
            {
                "prompt": doc["prompt"],
                "input": contexts[index],
                "target": doc["answer"],
                "loglikelihoods": lls,
                "pick": pick,
            }
        )
    return _mean_metric("acc", acc) | _mean_metric("acc_norm", acc_norm), samples


def _score_perplexity(loaded, docs, batch_size):
    """Token perplexity (model-specific) plus byte perplexity and bits per byte (tokenizer-free)."""
    texts = [doc["text"] for doc in docs]
    window = min(getattr(loaded.model.config, "max_position_embeddings", None) or MAX_WINDOW, MAX_WINDOW)
    totals = scoring.loglikelihood_rolling(loaded.model, loaded.tokenizer, texts, batch_size, max_length=window)
    log_likelihood = sum(total for total, _ in totals)
    tokens = sum(count for _, count in totals)
    n_bytes = sum(len(text.encode()) for text in texts)
    samples = [{"chars": len(t), "loglikelihood": ll, "tokens": n} for t, (ll, n) in zip(texts, totals, strict=True)]
    return {
        "perplexity,none": math.exp(-log_likelihood / tokens),
        "perplexity_stderr,none": None,
        "byte_perplexity,none": math.exp(-log_likelihood / n_bytes),
        "bits_per_byte,none": -log_likelihood / n_bytes / math.log(2),
        "tokens,none": tokens,
    }, samples


def _mean_metric(name: str, values: list[float]) -> dict:
    stderr = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {f"{name},none": statistics.fmean(values), f"{name}_stderr,none": stderr}


def metrics_of(results: dict) -> dict:
    """The run record's {task: {metric: {"value", "stderr"}}} view of an lm-eval-shaped results dict."""
    out: dict = {}
    for task, row in results["results"].items():
        for key, value in row.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = row.get(f"{metric}_stderr,{filter_name}")
            out.setdefault(task, {})[metric] = {"value": value, "stderr": stderr}
    return out


def default_output(model_ref: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(model_ref)).name or str(model_ref)).strip("_") or "model"
    return Path("runs") / "eval" / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_eval(
    model_ref: str | list[str],
    tasks: list[str],
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    **options,
) -> tuple[Path, dict]:
    """Evaluate and write results.json, samples_<task>.jsonl and run.json into a new output folder."""
    meter = RunMeter()
    label = (
        model_ref
        if isinstance(model_ref, str)
        else f"{options.get('fuse') or 'fused'}-" + "-".join(Path(str(ref)).name for ref in model_ref)
    )
    out = Path(out_dir) if out_dir else default_output(label)
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} exists: pass --overwrite or choose another folder")
    results = evaluate(model_ref, tasks, **options)
    samples = results.pop("samples")
    footprint = results.get("footprint") or {}
    with staged_output(out, overwrite=overwrite) as staging:
        write_json(staging / "results.json", results)
        for task, rows in samples.items():
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(task).stem)
            with open(staging / f"samples_{name}.jsonl", "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
        fuse, folder = results["config"].get("fuse"), results["config"]["model_folder"]
        if fuse:  # no one folder is the model: the members are, each fingerprinted
            members = [{"folder": f, "fingerprint": _fingerprint(Path(f))} for f in fuse["models"]]
            model_input = {"ref": model_ref, "fuse": fuse["method"], "members": members}
        else:
            model_input = {"ref": model_ref, "folder": folder, "fingerprint": _fingerprint(Path(folder))}
        record = run_record(
            "eval",
            "evaluate",
            meter,
            inputs={"model": model_input},
            data={task: results["versions"][task] for task in results["results"]},
            config={"tasks": tasks, **options},
            params_total=footprint.get("params_total"),
            size_bytes=footprint.get("size_bytes"),
            metrics=metrics_of(results) | ({"footprint": footprint} if footprint else {}),
        )
        write_json(staging / "run.json", record)
    return out, results


def _fingerprint(folder: Path) -> str:
    """Content hash of the weights: the GGUF file's hash for converted folders, else the safetensors files'.

    Takes the folder evaluate() already resolved: resolving again would re-hash a GGUF file.
    """
    source = folder / "lmforge_source.json"
    if source.is_file():
        return "gguf-sha256:" + json.loads(source.read_text())["sha256_16"]
    hashes = [file_sha256(p) for p in sorted(folder.glob("*.safetensors"))]
    return "safetensors-sha256:" + hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]
