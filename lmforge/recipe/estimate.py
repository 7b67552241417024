"""Rough time and memory of a recipe step, before it runs (`lmforge run --dry-run`, and the progress ETA).

How it is estimated: from the models' parameter counts P (read from safetensors headers and config.json,
nothing loaded), the step's optimiser steps, rows and tokens per row, and a few rates measured on this
project's 2-core CPU machine with SmolLM2-135M (docs/benchmarks.md):
- training: 6·P FLOP per token at 1.2e11 FLOP/s (LoRA SFT ran 152 tokens/s); full SFT the same; a
  distillation teacher's forward 2·P at the same rate;
- scoring text (probe, teacher forward): 2·P FLOP per token at 5e10 FLOP/s (probe: 9,908 tokens in 51 s);
- generating: 0.64 s per test record for 135M parameters (batch 8), scaled by P;
- footprint: 12 s for 135M, scaled by P; merging: every input read and the output written at 150 MB/s;
- every step pays ~8 s to start a process, import torch and load a model.
Memory is a peak-RSS guess: 0.45 GB of runtime plus fp32 weights (4·P bytes, times 1.9 while scoring,
times 4 more for full training's gradients and Adam state) plus saved activations (33 x batch x tokens x
layers x hidden x 4 bytes, fitted to 2.6 GB for LoRA SFT at batch 8). Expect +-50%: the figures are for
planning, and the run records measure the real costs.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.recipe.schema import merge_models

TRAIN_FLOPS = 1.2e11
SCORE_FLOPS = 5e10
GEN_S_PER_RECORD = 0.64
SAMPLE_S_PER_TOKEN = 0.005  # a distillation teacher's general-text samples, batch 8 (issue 17's acceptance run)
FOOTPRINT_S = 12.0
REF_PARAMS = 134.5e6
IO_BYTES_PER_S = 150e6
START_S = 8.0
RUNTIME_BYTES = 0.45e9
ACTIVATION_FACTOR = 33
PROBE_TOKENS, PROBE_DOCS = 9908, 24
TASK_RECORDS = 200


@dataclass(frozen=True)
class ModelFacts:
    """What the estimates need to know about a model."""

    params: int
    layers: int
    hidden: int
    vocab: int
    intermediate: int = 0  # MLP width (0: unknown)


@dataclass(frozen=True)
class Estimate:
    """A step's guessed cost, how it was guessed, and the model it will produce (for later steps)."""

    seconds: float
    peak_bytes: float
    basis: str
    output: ModelFacts | None = None


FactsOf = Callable[[str], "ModelFacts | None"]


def nothing(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    """Steps that only read JSON (compare): seconds, no model."""
    return Estimate(3.0, RUNTIME_BYTES / 2, "reads run records only")


def data(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    """Steps that write task records (data)."""
    return Estimate(3.0, RUNTIME_BYTES / 2, "writes built-in task records")


def select(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    known = []
    for candidate in config.get("candidates", []):
        scored = _eval_model(str(candidate))  # an eval run that exists names its model
        facts = facts_of(str(candidate)) or (facts_of(scored) if scored else None)
        known += [facts] if facts else []
    return Estimate(1.0, RUNTIME_BYTES / 2, "reads run records only", known[0] if known else None)


def model_facts(folder: str | Path) -> ModelFacts | None:
    """Facts of an existing model folder (a PEFT adapter counts as its base), or None when unreadable."""
    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not (folder / "config.json").is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        return facts_of_ref(base) if base else None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    params = sum(_header_numel(f) for f in folder.glob("*.safetensors"))
    text = config.get("text_config", config)
    return ModelFacts(
        params=params or int(REF_PARAMS),
        layers=int(text.get("num_hidden_layers", 1)),
        hidden=int(text.get("hidden_size", 1)),
        vocab=int(text.get("vocab_size", 1)),
        intermediate=int(text.get("intermediate_size") or 0),
    )


def facts_of_ref(ref: str) -> ModelFacts | None:
    """Facts of any model reference that exists on disk ('default' is converted once, as a run would)."""
    from lmforge.errors import UserError
    from lmforge.models.load import resolve_model

    path = Path(ref)
    if path.is_dir():
        return model_facts(path)
    try:
        return model_facts(resolve_model(ref))
    except UserError:
        return None


def _header_numel(file: Path) -> int:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(meta["shape"]) for name, meta in header.items() if name != "__metadata__")


def _eval_model(run_folder: str) -> str | None:
    """The model folder an existing eval run scored (None before it has run)."""
    try:
        return json.loads((Path(run_folder) / "run.json").read_text())["inputs"]["model"]["folder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _scale(facts: ModelFacts | None) -> float:
    return (facts.params if facts else REF_PARAMS) / REF_PARAMS


def _weights(facts: ModelFacts | None) -> float:
    return 4.0 * (facts.params if facts else REF_PARAMS)


def _tokens_per_row(data: Mapping[str, Any]) -> float:
    """Tokens of one training row: the first 64 records measured (chars / 4 + 30 for the chat template), from a
    built-in task or an existing file; 100 for a file that a step has not written yet."""
    cap = float(data.get("max_length", 512))
    chars: list[int] = []
    if data.get("task"):
        from lmforge.data import synthetic

        with contextlib.suppress(Exception):  # an unknown task fails in the step's own check
            chars = [len(r["prompt"]) + len(r["answer"]) for r in synthetic.examples(data["task"], "train")[:64]]
    elif data.get("path") and Path(data["path"]).is_file():
        with open(data["path"], encoding="utf-8") as handle:
            chars = [len(line) for line, _ in zip(handle, range(64), strict=False)]
    return min(cap, sum(chars) / len(chars) / 4 + 30 if chars else 100.0)


def _scoring_seconds(facts: ModelFacts | None, generate_records: int, probe: bool, probe_limit: int | None) -> float:
    seconds = generate_records * GEN_S_PER_RECORD * _scale(facts)
    if probe:
        docs = min(PROBE_DOCS, probe_limit or PROBE_DOCS)
        params = facts.params if facts else REF_PARAMS
        seconds += PROBE_TOKENS * docs / PROBE_DOCS * 2 * params / SCORE_FLOPS
    return seconds


def _training(train: Mapping[str, Any], data: Mapping[str, Any], facts: ModelFacts | None, full: bool):
    steps = int(train.get("max_steps", 100))
    batch = int(train.get("batch_size", 8))
    rows = steps * batch * int(train.get("grad_accum", 1))
    per_row = _tokens_per_row(data)
    params = facts.params if facts else REF_PARAMS
    seconds = rows * per_row * 6 * params / TRAIN_FLOPS
    layers, hidden = (facts.layers, facts.hidden) if facts else (30, 576)
    activations = ACTIVATION_FACTOR * batch * per_row * layers * hidden * 4
    peak = RUNTIME_BYTES + _weights(facts) * (1.5 + (4 if full else 0)) + activations
    return seconds, peak, f"{steps} steps x {batch * int(train.get('grad_accum', 1))} rows x ~{per_row:.0f} tokens"


def finetune(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    facts = facts_of(str(config.get("model", "default")))
    data, evals = config.get("data") or {}, config.get("eval") or {}
    seconds, peak, basis = _training(config.get("train") or {}, data, facts, config.get("method") == "full")
    scored = min(int(evals.get("limit", 50)), TASK_RECORDS) if (evals.get("task") or data.get("task")) else 0
    checks = 2 * _scoring_seconds(facts, scored, evals.get("probe", True), None)  # before and after
    return Estimate(START_S + seconds + checks, peak, f"{basis}; base and result scored on {scored} records", facts)


def distill(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    teacher = facts_of(str(config.get("teacher", "default")))
    student_ref = config.get("student")
    student = facts_of(str(student_ref)) if student_ref else None
    if student is None and teacher is not None:
        student = _student_facts(config, teacher)
    data, train = config.get("data") or {}, config.get("train") or {}
    seconds, peak, basis = _training(train, data, student, config.get("method", "full") == "full")
    rows = int(train.get("max_steps", 100)) * int(train.get("batch_size", 8)) * int(train.get("grad_accum", 1))
    # the teacher's forward on short rows runs at the training rate (2·P of the 6·P per token)
    teacher_s = rows * _tokens_per_row(data) * 2 * (teacher.params if teacher else REF_PARAMS) / TRAIN_FLOPS
    footprints = FOOTPRINT_S * (_scale(teacher) + _scale(student))  # distill measures both models
    evals = config.get("eval") or {}
    scored = min(int(evals.get("limit", 50)), TASK_RECORDS) if (evals.get("task") or data.get("task")) else 0
    checks = _scoring_seconds(teacher, scored, False, None) + _scoring_seconds(student, scored, False, None)
    general_s, general_basis = _general_text(config.get("general") or {}, rows, teacher, student)
    return Estimate(
        START_S + seconds + teacher_s + checks + footprints + general_s,
        peak + _weights(teacher),
        f"{basis}; teacher forward on every row{general_basis}",
        student,
    )


def _student_facts(config: Mapping[str, Any], teacher: ModelFacts) -> ModelFacts:
    """A student built from the teacher's layers, before it exists: the layers kept (all of them when only the
    width shrinks, as distill/run.py does), then the width: `params_fraction` as given, or a narrower MLP."""
    width = config.get("width") or {}
    width = width if isinstance(width, Mapping) else {}
    narrowed = any(width.get(key) for key in ("params_fraction", "intermediate_size", "hidden_size"))
    layers = int(config.get("student_layers") or (teacher.layers if narrowed else max(1, teacher.layers // 2)))
    embed = teacher.vocab * teacher.hidden
    body = max(teacher.params - embed, 0) * layers / max(teacher.layers, 1)
    if width.get("params_fraction"):
        fraction = float(width["params_fraction"])
        return ModelFacts(int(teacher.params * fraction), layers, teacher.hidden, teacher.vocab, teacher.intermediate)
    if width.get("intermediate_size") and teacher.intermediate:
        mlp_per_layer = 3 * teacher.hidden * (teacher.intermediate - int(width["intermediate_size"]))
        body = max(body - layers * mlp_per_layer, 0)
    hidden = int(width.get("hidden_size") or teacher.hidden)
    intermediate = int(width.get("intermediate_size") or teacher.intermediate)
    return ModelFacts(int((embed + body) * hidden / teacher.hidden), layers, hidden, teacher.vocab, intermediate)


def _general_text(general: Mapping[str, Any], rows: int, teacher, student) -> tuple[float, str]:
    """Seconds for distillation's general-text mix (default on: one row per task row) and the teacher's
    samples it is made of when no file is given."""
    ratio = float(general.get("ratio", 1.0))
    if not ratio:
        return 0.0, ""
    new_tokens = int(general.get("max_new_tokens", 128))
    tokens = min(int(general.get("max_length", 128)), new_tokens + 8)  # an opening and the teacher's text
    params = 6 * (student.params if student else REF_PARAMS) + 2 * (teacher.params if teacher else REF_PARAMS)
    seconds = rows * ratio * tokens * params / TRAIN_FLOPS
    samples = 0 if general.get("file") else int(general.get("samples", 64))
    seconds += samples * new_tokens * SAMPLE_S_PER_TOKEN * _scale(teacher)
    return seconds, f"; {ratio:g} general row{'' if ratio == 1 else 's'} of ~{tokens} tokens per task row" + (
        f", {samples} teacher samples" if samples else ""
    )


def merge(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    refs = [r for r in merge_models(dict(config)) if r]
    inputs = [facts_of(r) for r in dict.fromkeys(refs)]
    known = [f for f in inputs if f]
    out = known[0] if known else None
    moved = sum(_weights(f) for f in known) + _weights(out)
    seconds = START_S + moved / IO_BYTES_PER_S
    method = str(config.get("merge_method", ""))
    basis = f"{len(inputs)} models read, one written at {IO_BYTES_PER_S / 1e6:.0f} MB/s"
    if method == "greedy_soup":
        tasks_limit = _soup_scoring(config, out)
        seconds += tasks_limit
        basis += f"; each of {len(inputs)} candidate soups scored"
    elif method == "weight_search":
        trials, seconds_each = _search_scoring(config, out)
        seconds += trials * seconds_each
        basis += f"; {trials} weight combinations scored"
    largest = (out.vocab * out.hidden * 4) if out else 0.11e9
    return Estimate(seconds, RUNTIME_BYTES + (len(inputs) + 2) * largest, basis, out)


def moe(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    """`lmforge moe`: every source read and the MoE written, the base's forward over the router prompts, and
    the routing check (the MoE's forward over `routing_limit` texts per routing task)."""
    experts = [e for e in list(config.get("experts") or []) + list(config.get("shared_experts") or []) if e]
    base = facts_of(str(config.get("base_model", "default")))
    sources = [facts_of(str(e.get("source_model", ""))) for e in experts if isinstance(e, Mapping)]
    params = base.params if base else REF_PARAMS
    mlp = 3 * base.hidden * base.intermediate * base.layers if base and base.intermediate else params / 2
    total = params + max(len(sources) - 1, 0) * mlp
    out = ModelFacts(int(total), base.layers, base.hidden, base.vocab, base.intermediate) if base else None
    moved = sum(_weights(f) for f in [base, *sources] if f) + 4 * total
    prompts = sum(len(e.get("positive_prompts") or []) + len(e.get("negative_prompts") or []) for e in experts)
    seconds = START_S + moved / IO_BYTES_PER_S + prompts * 100 * 2 * params / SCORE_FLOPS
    routing = len(config.get("routing_tasks") or []) * int(config.get("routing_limit", 30))
    training = config.get("train_router")
    training = training if isinstance(training, Mapping) else ({} if training is not None else None)
    checks = 1 if training is None else 2  # router training measures routing before and after
    seconds += checks * routing * 100 * 2 * total / SCORE_FLOPS  # ~100 tokens a record; every expert runs on CPU
    basis = f"{len(sources)} experts read, {prompts} router prompts"
    basis += f", {routing} routing records" if routing else ""
    if training is not None:  # backward runs through the whole model to reach the first router
        steps, batch = int(training.get("steps", 50)), int(training.get("batch_size", 8))
        seconds += steps * batch * 100 * 6 * total / TRAIN_FLOPS
        basis += f", routers trained {steps} steps x {batch} rows"
    return Estimate(seconds, RUNTIME_BYTES + 2 * 4 * total, basis, out)


def filter_step(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    """`lmforge data filter`: when a rule needs the model, two forward passes per record (the answer after
    its prompt, and alone); the text checks alone take seconds."""
    facts = facts_of(str(config.get("model", "default")))
    data = {"task": config.get("task"), "path": config.get("data"), "max_length": config.get("max_length", 512)}
    records = config.get("limit")
    if records is None and data["path"] and Path(data["path"]).is_file():
        with open(data["path"], encoding="utf-8") as handle:
            records = sum(1 for line in handle if line.strip())
    records = int(records or 1000)
    bounds = ("nll_max", "nll_min", "ifd_min", "keep_fraction")
    scored = any(config.get(key) is not None for key in bounds) or config.get("ifd_max", 1.0) is not None
    if not scored:
        return Estimate(START_S + 0.01 * records, RUNTIME_BYTES, f"{records} records checked, no model", None)
    tokens = records * 1.5 * _tokens_per_row(data)  # the whole record, then the answer alone
    params = facts.params if facts else REF_PARAMS
    seconds = START_S + tokens * 2 * params / SCORE_FLOPS
    return Estimate(seconds, RUNTIME_BYTES + _weights(facts) * 1.9, f"{records} records scored twice", None)


def _soup_scoring(config: Mapping[str, Any], facts: ModelFacts | None) -> float:
    """A greedy soup scores one candidate soup per input model on its held-out records."""
    params = config.get("parameters") or {}
    limit = int(params.get("limit", 50)) if isinstance(params, Mapping) else 50
    return len(config.get("models") or []) * (START_S + _scoring_seconds(facts, limit, False, None))


def _search_scoring(config: Mapping[str, Any], facts: ModelFacts | None) -> tuple[int, float]:
    """A weight search scores every combination of its weights (one per model) on each held-out task."""
    params = config.get("parameters") or {}
    params = params if isinstance(params, Mapping) else {}
    weights, tasks = params.get("weights", [0.5, 1.0]), params.get("task") or []
    trials = len(weights if isinstance(weights, list) else [weights]) ** len(config.get("models") or [])
    records = int(params.get("limit", 50)) * len(tasks if isinstance(tasks, list) else [tasks])
    return trials, _scoring_seconds(facts, records, False, None)


def edit(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    """ProFS: one forward pass over both sides of every pair, the margin pairs scored before and after."""
    facts = facts_of(str(config.get("model", "default")))
    pairs = int(config.get("limit") or 300)
    evals = config.get("eval") or {}
    sides = 2 * pairs + 2 * min(pairs, 16)  # embeddings (margin before included), margin after (lmforge.edit.run)
    params = facts.params if facts else REF_PARAMS
    seconds = START_S + sides * 60 * 2 * params / SCORE_FLOPS  # ~60 tokens a rendered side (59,741 for 1,000)
    scored = min(int(evals.get("limit", 50)), TASK_RECORDS) if evals.get("task") else 0
    seconds += 2 * _scoring_seconds(facts, scored, evals.get("probe", True), None)
    return Estimate(seconds, RUNTIME_BYTES + _weights(facts) * 1.9, f"{sides} pair sides scored", facts)


def evaluation(config: Mapping[str, Any], facts_of: FactsOf) -> Estimate:
    model = config.get("model", "")
    members = len(model) if isinstance(model, list) and model else 1  # fused models: every member runs each step
    facts = facts_of(str(model[0] if isinstance(model, list) and model else model))
    tasks = list(config.get("tasks") or [])
    limit = config.get("limit")
    records = min(int(limit or TASK_RECORDS), TASK_RECORDS) * len([t for t in tasks if t != "probe"])
    seconds = START_S + members * _scoring_seconds(facts, records, "probe" in tasks, limit)
    if config.get("footprint", True):
        seconds += members * FOOTPRINT_S * _scale(facts)
    peak = RUNTIME_BYTES + members * _weights(facts) * 1.9
    return Estimate(seconds, peak, f"{records} generations" + (" + probe" if "probe" in tasks else ""), facts)
