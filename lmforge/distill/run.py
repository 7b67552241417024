"""`lmforge distill`: a smaller student learns from a teacher, through the one training loop.

Reads top to bottom: check the objectives, read the data (a file, or a built-in task's train split) and split
off validation, load and score the teacher (bf16 on GPU), make the general text mixed into every step
(distill/general.py: the teacher's samples or a file; optionally correct the teacher on it), prepare the
signal (dataset completions; teacher-written targets; step-by-step rationales), build the student (layers
picked from the teacher by a rule, or a given model sharing the tokenizer), print the init-quality line
(student vs random init vs teacher on a held-out batch), optionally cache the teacher's top-k signal and let
it go, train with the chunked distillation loss (on-policy batches are sampled in `collate`; task and general
rows in units at the mix ratio), keep the best validation checkpoint, and write a full model folder with
lmforge.yaml, run.json (teacher and student side by side: scores, retention, size and speed ratios),
log.jsonl and a model card. Interrupted runs resume from `<output>.work/` with `resume: true`.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge import config as config_io
from lmforge.cache import cache_dir
from lmforge.data.chat import IGNORE_INDEX, chat_prompt
from lmforge.data.prepare import DataSettings, tokenize, training_records
from lmforge.data.sources import split_records
from lmforge.distill import general, prune, signals
from lmforge.distill import rationale as step_by_step
from lmforge.distill import student as students
from lmforge.distill.general import GeneralSettings
from lmforge.distill.objectives import DenseTeacher, Objective, check_objectives, distill_loss
from lmforge.distill.rationale import RationaleSettings
from lmforge.distill.signals import SignalSettings
from lmforge.errors import UserError
from lmforge.eval.forgetting import EvalSettings, report_tasks, score
from lmforge.eval.run import metrics_of
from lmforge.eval.speed import measure_footprint
from lmforge.finetune.lora import LoraSettings, attach_lora, merge_and_verify
from lmforge.models.load import LoadedModel, load_model
from lmforge.outputs import CardTable, model_card, save_model, staged_output, write_run_files
from lmforge.report.record import RunMeter, run_record
from lmforge.train.allocator import return_freed_memory_to_os
from lmforge.train.chunked import on_model_device
from lmforge.train.engines import make_accelerator, prepare_frozen
from lmforge.train.loop import TrainConfig, restore_best, tokens_seen, train
from lmforge.train.progress import print_progress
from lmforge.train.validation import validation
from lmforge.train.workdir import on_interrupt, save_run_config, start_run

log = logging.getLogger("lmforge.distill")


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run: teacher, student, objectives, signal, training."""

    output: str
    """Output model folder (a full student model)."""
    teacher: str = "default"
    """Teacher model reference: default, a folder, a .gguf file or a hub id."""
    student: str | None = None
    """A smaller model sharing the teacher's tokenizer, or a config.json (random init); null: built from the
    teacher's layers."""
    student_layers: int | None = None
    """Teacher layers the built student keeps (null: half of them)."""
    layer_rule: Literal["measured", "first_last", "stride"] = "measured"
    """Which teacher layers a built student keeps (measured: the drop that hurts least on a calibration batch)."""
    student_intermediate: int | None = None
    """Narrower MLP width for a built student (null: the teacher's)."""
    width: prune.WidthSettings = field(default_factory=prune.WidthSettings)
    """Width pruning of a built student (Minitron): its shape, or its share of the teacher's parameters."""
    method: Literal["full", "lora"] = "full"
    """Train every student weight, or a LoRA adapter merged into the student at the end."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    objectives: list[Objective] = field(default_factory=lambda: [Objective("forward_kl")])
    """Weighted loss terms: forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tv, ce (labels)."""
    signal: SignalSettings = field(default_factory=SignalSettings)
    general: GeneralSettings = field(default_factory=GeneralSettings)
    """General text mixed into every step (default: the teacher's own samples, one row per task row)."""
    rationale: RationaleSettings = field(default_factory=RationaleSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Precision of the teacher while it gives the training signal. auto: bfloat16 on GPU and on CPUs that
    compute it natively (AVX512-BF16 or AMX: half the memory, about 2x faster), else float32. The teacher is
    scored, and a built student copied, at the precision it was loaded in."""
    chunk_size: int = 64
    """Positions whose vocabulary logits exist at once in the loss."""
    overwrite: bool = False
    """Replace an existing output folder."""
    resume: bool = False
    """Continue an interrupted run from <output>.work/."""

    def __post_init__(self) -> None:
        """Refuse, when the config is read (before any model loads), values and pairings with no meaning."""
        check_objectives(self.objectives)
        both = "cannot go with student: give student (a model) or student_layers (teacher layers kept), not both"
        config_io.require(self.student is None or self.student_layers is None, "student_layers", both)
        given = "cannot go with student (a given model): width prunes a student built from the teacher"
        config_io.require(self.student is None or not self.width.enabled, "width", given)
        twice = "cannot go with student_intermediate: set the MLP width once, as width.intermediate_size"
        config_io.require(self.student_intermediate is None or not self.width.enabled, "width", twice)
        for name in ("student_layers", "student_intermediate", "chunk_size"):
            config_io.at_least(self, name, 1)
        packs_generated = self.data.packing and (self.signal.kind == "on_policy" or self.rationale.enabled)
        config_io.require(not packs_generated, "data.packing", "does not mix with on_policy signals or rationales")
        generated = self.rationale.enabled and self.signal.kind in ("sequence", "on_policy")
        kind = f"goes with signal.kind offline or cached, not {self.signal.kind}"
        config_io.require(not generated, "rationale.enabled", kind)


class Guards:
    """Warnings that a run is going wrong, each printed once and counted for run.json."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def warn(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            log.warning("%s (warned once; run.json counts every time)", message)

    def check(self, stats: dict) -> None:
        if stats["tokens"] == 0:
            self.warn("empty_mask", "a micro-batch has no completion token to distill (empty completion mask)")
            return
        if stats.get("nonfinite"):
            self.warn("nonfinite", f"{stats['nonfinite']} divergence values are NaN or infinite")
        if stats.get("negative"):
            self.warn("negative", f"{stats['negative']} divergence values are negative (numerical trouble)")
        teacher_h = stats.get("teacher_entropy")
        collapsed = teacher_h is not None and stats["student_entropy"] < 0.1 * teacher_h
        if collapsed and teacher_h / stats["tokens"] > 0.1:
            self.warn(
                "entropy_collapse",
                f"student entropy collapsed ({stats['student_entropy'] / stats['tokens']:.3f} nats per token vs "
                f"the teacher's {teacher_h / stats['tokens']:.3f}): lower train.lr or add a forward_kl term",
            )


def make_loss_fn(teacher, cache, objectives: Sequence[Objective], vocab: int, chunk_size: int, guards: Guards):
    """loss_fn(model, batch) -> (summed loss, metrics) for the loop: student rows against the teacher's signal."""
    names = sorted({o.loss for o in objectives})

    def loss_fn(model, batch: dict):
        batch = on_model_device(model, batch)  # evaluators pass CPU batches; the loop's are there already
        rows, weight, bias, targets = students.completion_rows(model, batch, vocab)
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        if len(targets) and int(targets.max()) >= vocab:
            raise UserError(f"label id {int(targets.max())} is outside the {vocab} tokens both models share")
        if cache is not None:
            teacher_signal = cache.teacher_for(batch)
        else:
            with torch.no_grad():
                t_rows, t_weight, t_bias, _ = students.completion_rows(teacher, batch, vocab)
            teacher_signal = DenseTeacher(t_rows, t_weight, t_bias)
        weights = batch["weights"][:, 1:][keep] if "weights" in batch else None
        ce_mask = batch["label_is_data"][:, None].expand_as(keep)[keep].float() if "label_is_data" in batch else None
        loss, stats = distill_loss(
            rows, weight, teacher_signal, targets, objectives, weights, chunk_size, bias, ce_mask
        )
        guards.check(stats)
        n = max(stats["tokens"], 1)
        return loss, {"tokens": stats["tokens"]} | {name: stats.get(name, 0.0) / n for name in names}

    return loss_fn


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def distill(
    config: str | Path | Mapping[str, Any] | DistillConfig | None = None,
    overrides: Sequence[str] = (),
    **settings: Any,
) -> Path:
    """Distill a teacher into a smaller student and write the student's model folder; returns the folder.

    Args:
        config: a YAML file, a dict of the same keys, a DistillConfig, or None (defaults).
        overrides: "key.sub=value" strings, as on the command line.
        settings: config keys as keyword arguments, applied last, e.g. output="runs/student",
            teacher="default", student_layers=2, data={"task": "dates"}, train={"max_steps": 2}.
    """
    return run_distill(config_io.resolve(config, DistillConfig, overrides, **settings))


def _prepare_rows(cfg, teacher, tokenizer, records, work: Path, key: list) -> list[dict]:
    """Training rows for the signal kind: dataset, teacher-written, or both tasks of step-by-step."""
    if cfg.rationale.enabled:
        labels, rationales = step_by_step.rationale_records(
            teacher,
            tokenizer,
            records,
            cfg.rationale,
            work / "rationales.jsonl",
            signals.fingerprint(key, cfg.rationale),
        )
        return step_by_step.weigh(
            tokenize(labels, tokenizer, cfg.data), tokenize(rationales, tokenizer, cfg.data), cfg.rationale.alpha
        )
    if cfg.signal.kind == "sequence":
        path = Path(cfg.signal.cache) if cfg.signal.cache else work / "sequence_targets.jsonl"
        prompts = [chat_prompt(tokenizer, r["prompt"]) for r in records]
        sequence_key = signals.fingerprint(key, cfg.signal.max_new_tokens)
        records = signals.sequence_targets(teacher, tokenizer, records, prompts, cfg.signal, path, sequence_key)
    return tokenize(records, tokenizer, cfg.data)


def _general_rows(cfg, teacher_loaded: LoadedModel, texts: list[str] | None) -> list[dict]:
    """General-text rows from the user's file (`texts`, read already) or the teacher's samples; none when
    neither the mix nor the teacher correction asks for them."""
    settings = cfg.general
    if not (settings.enabled or settings.correct_teacher):
        return []
    if texts is None:
        key = signals.fingerprint(
            signals.teacher_key(teacher_loaded.folder),
            general.PROMPTS,
            settings.samples,
            settings.max_new_tokens,
            cfg.train.seed,
        )
        # shared by every run from this teacher with these settings (a size curve's students, reruns): the key
        # names the teacher's weights, the openings, the count, the length and the seed
        samples = general.teacher_samples(
            teacher_loaded.model,
            teacher_loaded.tokenizer,
            settings,
            cache_dir() / "general_samples" / f"{key}.jsonl",
            key,
            cfg.train.seed,
        )
        texts = general.without_probe(samples, "the teacher's samples")
    rows = general.rows(texts, teacher_loaded.tokenizer, settings.max_length)
    log.info("general text: %d rows from %s", len(rows), settings.file or "the teacher's samples")
    return rows


def _closer_start(cfg) -> str:
    """What to change when the built student starts worse than a random init of its shape."""
    if cfg.student is not None:
        return "its given weights are no better a start than a random init of its shape"
    if cfg.width.enabled:
        return "the width cut is too deep: raise width.params_fraction, or cut some depth and less width"
    if cfg.layer_rule != "measured":
        return "try layer_rule: measured"
    return "keep more student_layers"


def _build_student(
    cfg, teacher_loaded: LoadedModel, calibration: dict, general_batch: dict | None, work: Path
) -> tuple:
    """(student model, its tokenizer, shared vocabulary, random-init quality, description for run.json).

    The measured layer rule and width pruning score on the task's calibration batch and, when the run mixes
    general text in, on a batch of that text too (Minitron calibrates on its general pre-training data)."""
    teacher = teacher_loaded.model
    device = teacher.device
    if cfg.student is not None:
        if cfg.student.endswith(".json"):
            from transformers import AutoConfig

            settings = json.loads(Path(cfg.student).read_text(encoding="utf-8"))
            student_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
            model = students.random_student(student_config, cfg.train.seed).to(device)
            tokenizer = teacher_loaded.tokenizer
        else:
            loaded = load_model(cfg.student, device=str(device))
            model, tokenizer = loaded.model, loaded.tokenizer
            students.check_vocabularies(teacher_loaded.tokenizer, tokenizer)
        students.check_heads(model)
        vocab = students.shared_vocab(teacher, model)
        random_init = students.random_student(model.config, cfg.train.seed).to(device)
        baseline = students.quality(random_init, teacher, calibration, vocab)
        del random_init
        return model, tokenizer, vocab, baseline, {"ref": cfg.student}
    batches = [calibration, *([general_batch] if general_batch else [])]  # what layer and unit choices measure
    total = len(students.decoder_layers(teacher))
    keep = cfg.student_layers or (total if cfg.width.enabled else max(total // 2, 1))
    if keep > total or (keep == total and not cfg.width.enabled):
        raise UserError(f"student_layers={keep} keeps every one of the teacher's {total} layers: choose fewer")
    chosen = work / "student.json"
    candidates: list[dict] = []
    if keep == total:  # width pruning only
        layers = list(range(total))
    elif cfg.resume and chosen.is_file():
        layers = json.loads(chosen.read_text())["layers"]
    elif cfg.layer_rule == "measured":
        layers, candidates = students.measured_layers(teacher, batches, keep, students.shared_vocab(teacher, teacher))
        log.info(
            "measured layer rule: kept %s (KL %.3f; first_last %.3f, stride %.3f)",
            layers,
            candidates[0]["kl"],
            *(
                next(c["kl"] for c in candidates if c["layers"] == rule(total, keep))
                for rule in students.LAYER_RULES.values()
            ),
        )
    else:
        layers = students.LAYER_RULES[cfg.layer_rule](total, keep)
    shape = students.width_shape(teacher, len(layers), cfg.width) if cfg.width.enabled else None
    work.mkdir(parents=True, exist_ok=True)
    chosen.write_text(json.dumps({"layers": layers, "candidates": candidates}))
    importance = students.mlp_importance(teacher, calibration) if cfg.student_intermediate else None
    config = students.student_config(teacher, layers, cfg.student_intermediate)
    model = students.random_student(config, cfg.train.seed).to(device)
    vocab = students.shared_vocab(teacher, model)
    if shape is None:  # before the teacher's weights go in (a width-pruned student gets its own below)
        baseline = students.quality(model, teacher, calibration, vocab)
    students.copy_teacher_weights(model, teacher, layers, importance)
    description = {"from_teacher_layers": layers, "rule": cfg.layer_rule, "intermediate": cfg.student_intermediate}
    if shape is not None:  # the random-init baseline is then one of the pruned shape
        model = students.width_pruned(model, batches, shape)
        baseline = students.quality(
            students.random_student(model.config, cfg.train.seed).to(device), teacher, calibration, vocab
        )
        description["width"] = dataclasses.asdict(shape)
    return model, teacher_loaded.tokenizer, vocab, baseline, description


def run_distill(cfg: DistillConfig, on_log: Callable[[dict], None] | None = None) -> Path:
    """Distill, score teacher and student side by side, and write the output folder; returns its path.

    `on_log` also receives every log record of the loop. A run refused with a UserError leaves nothing behind
    (a resumed one keeps its work folder's caches)."""
    meter = RunMeter()
    general_file = None  # read before anything is written
    if cfg.general.file and (cfg.general.enabled or cfg.general.correct_teacher):
        general_file = general.without_probe(general.read_file(cfg.general.file), cfg.general.file)
    output, work = start_run(cfg)
    try:
        return _distill(cfg, meter, output, work, general_file, on_log)
    except UserError:
        if not cfg.resume:  # e.g. the teacher's general samples, written before the student was refused
            shutil.rmtree(work, ignore_errors=True)
        raise


def _distill(cfg: DistillConfig, meter: RunMeter, output: Path, work: Path, general_file, on_log) -> Path:
    if cfg.train.release_memory:  # from the start: a cached-signal run frees a whole teacher before training
        return_freed_memory_to_os()
    records = training_records(cfg.data)
    if not records:
        raise UserError("the dataset is empty: check data.path / data.task and data.limit")
    train_records, val_records = split_records(records, cfg.data.val_fraction, cfg.train.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_dtype = "bfloat16" if device == "cuda" and cfg.teacher_dtype != "float32" else "float32"
    teacher_loaded = load_model(cfg.teacher, dtype=load_dtype, device=device)
    teacher, tokenizer = teacher_loaded.model, teacher_loaded.tokenizer
    teacher.requires_grad_(False)
    students.check_heads(teacher)
    key = [signals.teacher_key(teacher_loaded.folder), cfg.data, cfg.train.seed]
    tasks = report_tasks(cfg.eval, cfg.data.task)
    teacher_scores = score(teacher_loaded, tasks, cfg.eval)  # the teacher as given, before any correction
    teacher_footprint = _teacher_footprint(teacher_loaded)  # now: later the teacher may be gone (cached signal)
    general_rows = _general_rows(cfg, teacher_loaded, general_file)
    if cfg.general.correct_teacher:
        teacher = general.correct_teacher(
            teacher, general_rows, cfg.general, tokenizer.pad_token_id, work, cfg.train.seed, cfg.resume
        )
        teacher_loaded.model = teacher
        key.append(["corrected", cfg.general])
    train_rows = _prepare_rows(cfg, teacher, tokenizer, train_records, work, key)
    val_rows = tokenize(val_records, tokenizer, cfg.data) if val_records else []
    general_rows = general_rows if cfg.general.enabled else []
    for index, row in enumerate(train_rows + val_rows + general_rows):
        row["row"] = index  # the cached teacher signal is indexed by row
    collate = signals.batch_collate(tokenizer.pad_token_id)
    calibration = _to(collate((val_rows or train_rows)[:8]), device)
    general_batch = _to(collate(general_rows[:8]), device) if general_rows else None

    student, student_tokenizer, vocab, random_quality, described = _build_student(
        cfg, teacher_loaded, calibration, general_batch, work
    )
    student_params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    if student_params >= teacher_params:
        log.warning("the student (%d parameters) is not smaller than the teacher (%d)", student_params, teacher_params)
    init = {
        "student": students.quality(student, teacher, calibration, vocab),
        "random_init": random_quality,
        "teacher": students.quality(teacher, teacher, calibration, vocab),
    }
    log.info(
        "init quality (completion CE, KL to teacher): student %.3f, %.3f | random init %.3f, %.3f | teacher CE %.3f",
        init["student"]["ce"],
        init["student"]["kl"],
        random_quality["ce"],
        random_quality["kl"],
        init["teacher"]["ce"],
    )
    if init["student"]["kl"] >= random_quality["kl"]:
        log.warning("the student starts further from the teacher than a random init: %s", _closer_start(cfg))

    signal_dtype = _signal_dtype(cfg.teacher_dtype, device)
    signal_name = str(signal_dtype).removeprefix("torch.")
    if teacher.dtype != signal_dtype:
        log.info("teacher in %s for the training signal (teacher_dtype: %s)", signal_name, cfg.teacher_dtype)
        teacher.to(signal_dtype)
    cache = None
    if cfg.signal.kind == "cached":
        cache = _cached_signal(cfg, teacher, train_rows + val_rows + general_rows, collate, vocab, work, key)
        teacher_loaded.model = teacher = None  # training runs without the teacher in memory
        gc.collect()

    if teacher is not None:  # sharded under FSDP2 with several processes, whole otherwise (engines.prepare_frozen)
        accelerator = make_accelerator(
            cfg.train.mixed_precision, batch_size=cfg.train.batch_size, max_grad_norm=cfg.train.max_grad_norm
        )
        teacher = prepare_frozen(teacher, accelerator)
    torch.manual_seed(cfg.train.seed)
    model = attach_lora(student, cfg.lora) if cfg.method == "lora" else student.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    guards = Guards()
    loss_fn = make_loss_fn(teacher, cache, cfg.objectives, vocab, cfg.chunk_size, guards)
    train_collate = collate
    if cfg.signal.kind == "on_policy":
        train_collate = signals.on_policy(
            collate, model, cfg.signal, tokenizer.pad_token_id, tokenizer.eos_token_id, guards.warn
        )
    loop_rows = train_rows
    if general_rows:  # units of task and general rows at the ratio; validation stays on the task
        general_loss = make_loss_fn(teacher, cache, cfg.general.objectives, vocab, cfg.chunk_size, guards)
        loop_rows = general.units(train_rows, general_rows, cfg.general.ratio)
        loss_fn = general.mixed_loss(loss_fn, general_loss, cfg.general.weight, general.token_ratio(loop_rows))
        train_collate = general.mixed_collate(train_collate, collate)
    save_run_config(cfg, work)
    with on_interrupt(work):
        history = train(
            model,
            loop_rows,
            loss_fn,
            train_collate,
            cfg.train,
            work,
            evaluate=validation(val_rows, collate, loss_fn) if val_rows else None,
            resume=cfg.resume,
            on_log=print_progress(cfg.train.max_steps, on_log),
        )
    restore_best(model, work)
    model.eval()
    final = merge_and_verify(model, [_to(collate(train_rows[:4]), device)]) if cfg.method == "lora" else model
    final = final.to("cpu")

    with staged_output(output, overwrite=True) as staging:
        save_model(staging, final, student_tokenizer)
        student_loaded = LoadedModel(final, student_tokenizer, str(output), staging, 0.0)
        student_scores = score(student_loaded, tasks, cfg.eval)
        footprint = {"student": measure_footprint(student_loaded), "teacher": teacher_footprint}
        record = run_record(
            "distill",
            f"distill-{cfg.method}-{cfg.signal.kind}",
            meter,
            inputs={"teacher": {"ref": cfg.teacher, "folder": str(teacher_loaded.folder)}, "student": described},
            data={
                "path": cfg.data.path,
                "task": cfg.data.task,
                "train_records": len(train_records),
                "val_records": len(val_records),
                "train_rows": len(train_rows),
                "general_rows": len(general_rows),
                "general_source": (cfg.general.file or "teacher samples") if general_rows else None,
            },
            config=config_io.to_dict(cfg),
            tokens_seen=tokens_seen(history),
            params_total=student_params,
            params_trainable=trainable,
            size_bytes=footprint["student"]["size_bytes"],
            metrics=metrics_of(student_scores) if student_scores else {},
        )
        record |= comparison(teacher_scores, student_scores, footprint)
        record |= {"init_quality": init, "guards": dict(guards.counts), "teacher_signal_dtype": signal_name}
        write_run_files(staging, cfg, record, _model_card(cfg, record), work / "log.jsonl")
    _print_comparison(record)
    shutil.rmtree(work, ignore_errors=True)
    return output


def _teacher_footprint(loaded: LoadedModel) -> dict:
    """The teacher's size and speed measured as the student's will be (on the CPU, in float32).

    Taken before training, while the teacher is loaded anyway: a cached-signal run then never holds it again
    (reloading it at the end put the run's peak memory there, on top of the heap training left behind).
    """
    model = loaded.model
    if model.device.type == "cpu" and model.dtype == torch.float32:
        return measure_footprint(loaded)
    copy = load_model(str(loaded.folder), dtype="float32", device="cpu")  # a GPU or bf16 teacher stays as it is
    footprint = measure_footprint(dataclasses.replace(copy, load_s=loaded.load_s))
    del copy
    gc.collect()
    return footprint


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (else torch emulates them, slower than fp32)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: stay in float32
        return False


def _signal_dtype(choice: str, device: str) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device == "cuda" or native_bf16_cpu() else torch.float32
    return getattr(torch, choice)


def _cached_signal(cfg, teacher, rows, collate, vocab: int, work: Path, key: list):
    """Write the teacher's top-k signal once (or reuse a matching file) and read it back."""
    from safetensors import safe_open

    path = Path(cfg.signal.cache) if cfg.signal.cache else work / "teacher_topk.safetensors"
    objectives = [*cfg.objectives, *(cfg.general.objectives if cfg.general.enabled else [])]
    temperatures = sorted({o.temperature for o in objectives if o.loss != "ce"}) or [1.0]
    cache_key = signals.fingerprint(key, cfg.signal.top_k, temperatures, len(rows), vocab, str(teacher.dtype))
    current = None
    if path.is_file():
        with safe_open(str(path), "pt") as handle:
            current = (handle.metadata() or {}).get("key")
    if current != cache_key:
        log.info("writing the teacher's top-%d signal for %d rows to %s", cfg.signal.top_k, len(rows), path)
        signals.write_topk_cache(teacher, rows, collate, vocab, cfg.signal.top_k, temperatures, path, cache_key)
    return signals.TopKCache(path)


def comparison(teacher_scores: dict | None, student_scores: dict | None, footprint: dict) -> dict:
    """Teacher metrics, retention (student / teacher) per metric, and size and speed ratios."""
    teacher_metrics = metrics_of(teacher_scores) if teacher_scores else {}
    student_metrics = metrics_of(student_scores) if student_scores else {}
    retention = {}
    for task, metrics in teacher_metrics.items():
        for metric in ("exact_match", "acc", "acc_norm"):
            if metric in metrics and metrics[metric]["value"]:
                ratio = student_metrics[task][metric]["value"] / metrics[metric]["value"]
                retention.setdefault(task, {})[metric] = round(ratio, 4)
    t, s = footprint["teacher"], footprint["student"]
    ratios = {
        "params": round(s["params_total"] / t["params_total"], 4),
        "bytes": round(s["size_bytes"] / t["size_bytes"], 4),
        "ms_per_token": round(s["ms_per_token"] / t["ms_per_token"], 4) if t["ms_per_token"] else None,
        "speedup": round(t["ms_per_token"] / s["ms_per_token"], 3) if s["ms_per_token"] else None,
    }
    return {"teacher_metrics": teacher_metrics, "retention": retention, "footprint": footprint, "ratios": ratios}


def _rows(record: dict) -> list[tuple[str, str, float, float]]:
    return [
        (task, metric, cell["value"], record["metrics"][task][metric]["value"])
        for task, metrics in record["teacher_metrics"].items()
        for metric, cell in metrics.items()
        if metric in ("exact_match", "acc", "perplexity")
    ]


def _print_comparison(record: dict) -> None:
    for task, metric, teacher, student in _rows(record):
        log.info("%s %s: teacher %.4f -> student %.4f", task, metric, teacher, student)
    r = record["ratios"]
    log.info(
        "student/teacher: parameters %.2fx, bytes %.2fx, generation speed %sx", r["params"], r["bytes"], r["speedup"]
    )


def _model_card(cfg: DistillConfig, record: dict) -> str:
    r, f = record["ratios"], record["footprint"]
    terms = ", ".join(f"{o.weight} x {o.loss} (T={o.temperature})" for o in cfg.objectives)
    sentence = f"Distilled from `{cfg.teacher}` by lmforge ({cfg.method}, {cfg.signal.kind} signal; {terms})."
    scores = CardTable(
        ["task", "metric", "teacher", "student"], [[t, m, f"{a:.4f}", f"{b:.4f}"] for t, m, a, b in _rows(record)]
    )
    sizes = [
        ["parameters", f"{f['teacher']['params_total']:,}", f"{f['student']['params_total']:,}", str(r["params"])],
        ["bytes", f"{f['teacher']['size_bytes']:,}", f"{f['student']['size_bytes']:,}", str(r["bytes"])],
        [
            "ms per token",
            str(f["teacher"]["ms_per_token"]),
            str(f["student"]["ms_per_token"]),
            str(r["ms_per_token"]),
        ],
    ]
    return model_card(Path(cfg.output).name, sentence, [scores, CardTable(["", "teacher", "student", "ratio"], sizes)])
