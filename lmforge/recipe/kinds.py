"""Step kinds: what a recipe step may be, as one dict of plain records [STYLE 4].

Each `Kind` says how the runner checks a step's config before anything runs (the command's own config
schema), which keys name models (checked to exist), where the output folder goes, how to guess its cost
(`estimate.py`) and how to run it: `run(config_file, output, overwrite) -> output`, a call to the public
API with the YAML file the runner wrote. finetune, distill and merge are the commands of those names;
`eval` is `run_eval`; `data` writes built-in task records as files; `select` picks the best model among
eval runs (so a recipe can distill "the best merge"); `filter` is `lmforge data filter` (its output holds
kept.jsonl, a later step's data.path); `compare` writes the report; `export` writes a
model as one GGUF file (its output is that file, so later steps can load it); `edit` is `lmforge edit`
(ProFS, no training). A kind whose module
is not installed is refused before any step runs.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.recipe import estimate
from lmforge.recipe.schema import merge_models, models_at

Runner = Callable[[Path, Path, bool], Path]


@dataclass(frozen=True)
class Kind:
    """What the runner needs to know about one kind of step."""

    run: Runner
    """(config file, output folder, overwrite) -> the step's result, the path ${steps.NAME.output} names."""
    check: Callable[[dict, str], None]
    """Validate a config (references already replaced by future paths); raises a one-line UserError."""
    models: Callable[[dict], list[str]] = lambda config: []
    """Model references the config names, checked to exist before anything runs."""
    estimate: Callable[[dict, estimate.FactsOf], estimate.Estimate] = estimate.nothing
    """Time and memory guess for --dry-run and the progress ETA."""
    output_key: str | None = "output"
    """Config key that receives the output folder (None: the API takes it as an argument)."""
    needs: str = ""
    """Module that must be importable for this kind to exist in this install."""

    def missing(self) -> str:
        """Why the kind cannot run here ('' when it can)."""
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed"
        return ""


@dataclass(frozen=True)
class EvalStep:
    """An `eval` step: `run_eval` with these arguments."""

    model: str | list[str]
    """Model reference or a step's output; a list of them with `fuse`."""
    tasks: list[str]
    """Built-in task names or .jsonl task files."""
    output: str | None = None
    """Set by the runner."""
    limit: int | None = None
    """Score only the first N records of each task (the probe included)."""
    num_fewshot: int = 0
    """k example turns before each prompt."""
    batch_size: int = 8
    """Requests per forward pass."""
    footprint: bool = True
    """Measure size, speed and memory."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16."""
    fuse: str | None = None
    """ensemble | product | dexperts | contrastive: score the models fused at generation (eval/fusion.py)."""
    fuse_weights: list[float] | None = None
    """ensemble/product weights, one per model."""
    fuse_alpha: float | None = None
    """dexperts' scale of (tuned - untuned), contrastive's plausibility cut-off."""


@dataclass(frozen=True)
class SelectStep:
    """A `select` step: the model of the best eval run among candidates."""

    candidates: list[str]
    """Eval run folders (usually ${steps.NAME.output} of eval steps)."""
    tasks: list[str]
    """Tasks whose headline metric decides (higher is better)."""
    rule: Literal["mean", "min"] = "mean"
    """Rank by the mean over tasks, or by the worst task."""
    output: str | None = None
    """Set by the runner: holds the choice as run.json."""


@dataclass(frozen=True)
class CompareStep:
    """A `compare` step: `lmforge compare` over run folders."""

    runs: list[str]
    """Run folders, each optionally LABEL=PATH."""
    baseline: str | None = None
    """Row the deltas are taken against (default: the first)."""
    title: str = "lmforge comparison"
    """Report title."""
    output: str | None = None
    """Set by the runner: report.md, report.html, plots/."""


@dataclass(frozen=True)
class DataStep:
    """A `data` step: built-in task records written as files later steps read.

    Writes OUTPUT/train.jsonl ({prompt, completion}: data.path of finetune or distill) and OUTPUT/task.jsonl
    ({prompt, answer}: a user task for eval or a greedy soup), the tasks interleaved so any prefix is mixed,
    and OUTPUT/task_NAME.jsonl per task (a weight search scores each task apart).
    """

    tasks: list[str]
    """Built-in tasks to draw from."""
    count: int
    """Records per task."""
    split: Literal["train", "test"] = "train"
    """Fixed split to draw from."""
    start: int = 0
    """Index of the first record (records before it are left out, e.g. those a fine-tune trains on)."""
    output: str | None = None
    """Set by the runner."""


@dataclass(frozen=True)
class ExportStep:
    """An `export` step: `export_gguf` of a llama model to OUTPUT/NAME/NAME.gguf (`lmforge export --gguf`)."""

    model: str
    """Model reference or a step's output (a LoRA adapter is merged into its base first)."""
    type: Literal["f16", "q8_0"] = "f16"
    """f16: matrices as float16; q8_0: 8-bit blocks, about half the size."""
    output: str | None = None
    """Set by the runner: the folder that holds the file."""


def _checker(cls_path: str) -> Callable[[dict, str], None]:
    """A check that builds the command's config dataclass from the step's config."""

    def check(config: dict, where: str) -> None:
        module, name = cls_path.split(":")
        config_io.from_dict(config, getattr(importlib.import_module(module), name), where)

    return check


def _run_finetune(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.finetune.sft import finetune

    return finetune(config_file, ["overwrite=true"] if overwrite else [])


def _run_distill(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.distill.run import distill

    return distill(config_file, ["overwrite=true"] if overwrite else [])


def _run_merge(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.merge.run import merge

    return merge(config_file, output, overwrite=overwrite)


def _run_edit(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.edit.run import edit

    return edit(config_file, ["overwrite=true"] if overwrite else [])


def _run_moe(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.merge.moe import moe

    return moe(config_file, output, overwrite=overwrite)


def _check_moe(config: dict, where: str) -> None:
    from lmforge.merge.moe import check, read_config  # the moe command's own validator

    check(read_config(config)[0], where)


def _moe_models(config: dict) -> list[str]:
    experts = list(config.get("experts") or []) + list(config.get("shared_experts") or [])
    return models_at(config, "base_model") + [
        m for e in experts if isinstance(e, dict) for m in models_at(e, "source_model")
    ]


def _run_eval(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.eval.run import run_eval
    from lmforge.report.tables import print_results

    step = config_io.load(config_file, EvalStep)
    folder, results = run_eval(
        step.model,
        step.tasks,
        out_dir=output,
        overwrite=overwrite,
        limit=step.limit,
        num_fewshot=step.num_fewshot,
        batch_size=step.batch_size,
        footprint=step.footprint,
        dtype=step.dtype,
        fuse=step.fuse,
        fuse_weights=step.fuse_weights,
        fuse_alpha=step.fuse_alpha,
    )
    print_results(results)
    return folder


def _run_data(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.data import synthetic
    from lmforge.outputs import staged_output

    step = config_io.load(config_file, DataStep)
    drawn = [synthetic.examples(task, step.split)[step.start : step.start + step.count] for task in step.tasks]
    if min(len(records) for records in drawn) < step.count:
        end = step.start + step.count
        raise UserError(f"{config_file}: the {step.split} split has fewer than start + count = {end} records")
    mixed = [record for group in zip(*drawn, strict=True) for record in group]
    with staged_output(output, overwrite) as staging:
        train = [json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n" for r in mixed]
        (staging / "train.jsonl").write_text("".join(train), encoding="utf-8")
        (staging / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed), encoding="utf-8")
        for task, records in zip(step.tasks, drawn, strict=True):  # one task per file: scored one by one
            lines = "".join(json.dumps(r) + "\n" for r in records)
            (staging / f"task_{task}.jsonl").write_text(lines, encoding="utf-8")
    return output


def _run_filter(config_file: Path, output: Path, overwrite: bool) -> Path:
    from rich.console import Console

    from lmforge.data.filter import filter_data, print_reasons

    result = filter_data(config_file, ["overwrite=true"] if overwrite else [])
    print_reasons(result, Console())
    return result.output


def _run_export(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.models.gguf_export import export_gguf
    from lmforge.outputs import staged_output

    step = config_io.load(config_file, ExportStep)
    with staged_output(output, overwrite) as staging:
        export_gguf(step.model, staging / f"{output.name}.gguf", step.type)
    return output / f"{output.name}.gguf"


def _run_select(config_file: Path, output: Path, overwrite: bool) -> Path:
    from lmforge.recipe.select import select_best

    step = config_io.load(config_file, SelectStep)
    return select_best(step.candidates, step.tasks, step.rule, output, overwrite)


def _run_compare(config_file: Path, output: Path, overwrite: bool) -> Path:
    from rich.console import Console

    from lmforge.report.compare import compare, print_comparison

    step = config_io.load(config_file, CompareStep)
    comparison = compare(step.runs, baseline=step.baseline, out=output, title=step.title, overwrite=overwrite)
    print_comparison(comparison, Console())
    return output


def _check_merge(config: dict, where: str) -> None:
    from lmforge.merge.config import read  # the merge command's own validator

    try:
        read(config)
    except UserError as err:
        raise UserError(f"{where}: {str(err).removeprefix('config: ')}") from None


def _check_select(config: dict, where: str) -> None:
    step = config_io.from_dict(config, SelectStep, where)
    if not step.candidates or not step.tasks:
        raise UserError(f"{where}: 'candidates' and 'tasks' must each name at least one item")


KINDS: dict[str, Kind] = {
    "finetune": Kind(
        run=_run_finetune,
        check=_checker("lmforge.finetune.sft:SFTConfig"),
        models=lambda config: models_at(config, "model") or ["default"],
        estimate=estimate.finetune,
    ),
    "distill": Kind(
        run=_run_distill,
        check=_checker("lmforge.distill.run:DistillConfig"),
        models=lambda config: models_at(config, "teacher", "student"),
        estimate=estimate.distill,
        needs="lmforge.distill",
    ),
    "merge": Kind(
        run=_run_merge,
        check=_check_merge,
        models=merge_models,
        estimate=estimate.merge,
        output_key=None,
        needs="lmforge.merge",
    ),
    "edit": Kind(
        run=_run_edit,
        check=_checker("lmforge.edit.run:EditConfig"),
        models=lambda config: models_at(config, "model") or ["default"],
        estimate=estimate.edit,
        needs="lmforge.edit",
    ),
    "moe": Kind(
        run=_run_moe,
        check=_check_moe,
        models=_moe_models,
        output_key=None,
        needs="lmforge.merge",
        estimate=estimate.moe,
    ),
    "eval": Kind(
        run=_run_eval,
        check=_checker("lmforge.recipe.kinds:EvalStep"),
        models=lambda config: (
            [m for m in config["model"] if isinstance(m, str)]
            if isinstance(config.get("model"), list)
            else models_at(config, "model")
        ),
        estimate=estimate.evaluation,
    ),
    "data": Kind(run=_run_data, check=_checker("lmforge.recipe.kinds:DataStep"), estimate=estimate.data),
    "filter": Kind(
        run=_run_filter,
        check=_checker("lmforge.data.filter:FilterConfig"),
        models=lambda config: models_at(config, "model") or ["default"],
        estimate=estimate.filter_step,
    ),
    "select": Kind(run=_run_select, check=_check_select, estimate=estimate.select),
    "compare": Kind(run=_run_compare, check=_checker("lmforge.recipe.kinds:CompareStep")),
    "export": Kind(
        run=_run_export,
        check=_checker("lmforge.recipe.kinds:ExportStep"),
        models=lambda config: models_at(config, "model"),
    ),
}
