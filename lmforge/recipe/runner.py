"""`lmforge run RECIPE.yaml`: run a recipe's steps in order, each in its own process, resumably.

Reads top to bottom: load and validate the whole recipe (nothing runs on a bad one), order the steps by
their references, guess each step's cost, then for each step substitute the outputs it cites, write its
config as OUTPUT/steps/NAME.yaml and call the command's API on that file. A step is skipped when it finished
before with the same fingerprint: the hash of its resolved config and of the content of every file and
folder it cites (a folder's top-level files, by name and sha256: a model folder replaced with retrained weights
of the same shapes changes it, as a rerun upstream step does). The state lives in
OUTPUT/recipe-state.json, written after each step, so an interrupted recipe resumes where it stopped.
Each step runs in a child process (`python -m lmforge.recipe.runner`), so its run.json measures its own
peak memory (the high-water mark is per process) and its log is teed to OUTPUT/steps/NAME.log.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lmforge import config as config_io
from lmforge import logs
from lmforge.cache import file_sha256
from lmforge.errors import UserError
from lmforge.recipe import estimate as estimates
from lmforge.recipe.kinds import KINDS, Kind
from lmforge.recipe.schema import Recipe, Step, dependencies, order, substitute, validate
from lmforge.report.record import write_json

STATE_FILE = "recipe-state.json"
STEPS = "steps"  # OUTPUT/steps/ holds each step's written config, log and result
ESTIMATE_NOTE = (
    "estimates: parameter counts x steps x tokens at rates measured on a 2-core CPU with SmolLM2-135M "
    "(lmforge/recipe/estimate.py); expect +-50%"
)
# Estimated seconds of prior evidence that the estimates are right: the measured pace moves the ETA only as
# estimated work accumulates, so a 3 s step that ends in 0 s does not shrink an hour's ETA to minutes.
PACE_PRIOR_S = 120.0


@dataclass
class Planned:
    """A step in run order, with its guessed cost and whether it will run."""

    step: Step
    estimate: estimates.Estimate
    runs: bool = True
    reason: str = ""


def run_recipe(
    recipe: str | Path | Mapping[str, Any] | Recipe | None = None,
    out: str | Path | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    kinds: Mapping[str, Kind] = KINDS,
    isolate: bool = True,
    console: Console | None = None,
    overrides: Sequence[str] = (),
    **settings: Any,
) -> Path:
    """Run (or with `dry_run`, only plan) a recipe; returns its output folder.

    Args:
        recipe: a recipe YAML file, a dict of the same keys, a Recipe, or None (the keys come as `settings`).
        out: folder for every step's output (default: the recipe's `output`).
        dry_run: print the plan with time and memory estimates, run nothing.
        overwrite: rerun every step and replace outputs this recipe did not write.
        kinds: step kinds (tests add fake ones; the product uses KINDS).
        isolate: run each step in a child process (per-step peak memory); False runs them in this process.
        overrides: "key.sub=value" strings over the recipe, as on the command line.
        settings: recipe keys as keyword arguments (steps=[...], output=..., description=...).
    """
    console = console or Console()
    where = str(recipe) if isinstance(recipe, (str, Path)) else "recipe"
    recipe = config_io.resolve(recipe, Recipe, overrides, **settings)
    if out is not None:
        recipe = dataclasses.replace(recipe, output=str(out))
    validate(recipe, where, kinds)
    root = Path(recipe.output).absolute()  # run records name model folders: keep them valid from any cwd
    recipe = dataclasses.replace(recipe, output=str(root))
    state = _read_state(root)
    plan = make_plan(recipe, kinds, state, overwrite, where)
    if dry_run:
        print_plan(plan, recipe, root, console)
        return root
    _refuse_foreign_outputs(plan, root, state, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, str] = {}
    done_est = done_real = 0.0
    started = time.perf_counter()
    for index, item in enumerate(plan, 1):
        step, kind = item.step, kinds[item.step.kind]
        config = substitute(step.config, outputs)
        if kind.output_key:
            config = {**config, kind.output_key: str(root / step.name)}
        fingerprint = step_fingerprint(step.kind, config, root / step.name)
        record = state.get(step.name, {})
        if not overwrite and record.get("fingerprint") == fingerprint and Path(record.get("output", "")).exists():
            outputs[step.name] = record["output"]
            console.print(f"[dim]step {index}/{len(plan)} {step.name}: unchanged, kept {record['output']}[/dim]")
            continue
        remaining = sum(p.estimate.seconds for p in plan[index - 1 :] if p.runs or p is item)
        pace = eta_pace(done_real, done_est)
        console.rule(
            f"step {index}/{len(plan)}: {step.name} ({step.kind}) · est. {_duration(item.estimate.seconds * pace)}"
            f" · recipe ETA {_duration(remaining * pace)}"
        )
        config_file = root / STEPS / f"{step.name}.yaml"
        config_file.parent.mkdir(exist_ok=True)
        config_file.write_text(config_io.to_yaml(config), encoding="utf-8")
        replace = overwrite or step.name in state
        begin = time.perf_counter()
        result = _execute(step, kind, config_file, root / step.name, replace, isolate)
        seconds = time.perf_counter() - begin
        done_est, done_real = done_est + item.estimate.seconds, done_real + seconds
        outputs[step.name] = str(result)
        state[step.name] = {"fingerprint": fingerprint, "output": str(result), "kind": step.kind, "wall_s": seconds}
        write_json(root / STATE_FILE, {"steps": state})
        console.print(f"[green]step {step.name} done in {_duration(seconds)}[/green] -> {result}")
    console.print(f"recipe finished in {_duration(time.perf_counter() - started)}; outputs in {root}")
    for item in plan:
        if item.step.kind == "compare":
            console.print(f"report: {root / item.step.name / 'report.html'}")
    return root


def eta_pace(done_real: float, done_est: float) -> float:
    """Measured over estimated time of the steps run so far, pulled towards 1 while little has run."""
    return (done_real + PACE_PRIOR_S) / (done_est + PACE_PRIOR_S)


def make_plan(
    recipe: Recipe, kinds: Mapping[str, Kind], state: dict, overwrite: bool = False, where: str = "recipe"
) -> list[Planned]:
    """Steps in run order with estimates; a step 'runs' unless it is unchanged and nothing it cites reruns."""
    root = Path(recipe.output)
    future = {name: str(root / name) for name in (s.name for s in recipe.steps)}
    predicted: dict[str, estimates.ModelFacts | None] = {}
    cache: dict[str, estimates.ModelFacts | None] = {}

    def facts_of(ref: str) -> estimates.ModelFacts | None:
        if ref in predicted:
            return predicted[ref]
        if ref not in cache:
            cache[ref] = estimates.facts_of_ref(ref)
        return cache[ref]

    deps = dependencies(recipe, where)
    plan, running = [], set()
    for step in order(recipe, where):
        kind = kinds[step.kind]
        config = substitute(step.config, future)
        guess = kind.estimate(config, facts_of)
        predicted[future[step.name]] = guess.output
        item = Planned(step, guess)
        record = state.get(step.name)
        cited_rerun = [d for d in deps[step.name] if d in running]
        if overwrite:
            item.reason = "yes: --overwrite"
        elif not record:
            item.reason = "yes: new"
        elif cited_rerun:
            item.reason = f"yes: {cited_rerun[0]} reruns"
        else:
            real = substitute(step.config, {n: state[n]["output"] for n in deps[step.name]})
            if kind.output_key:
                real = {**real, kind.output_key: future[step.name]}
            same = record.get("fingerprint") == step_fingerprint(step.kind, real, root / step.name)
            item.runs, item.reason = (False, "unchanged") if same else (True, "yes: changed")
        if item.runs:
            running.add(step.name)
        plan.append(item)
    return plan


def step_fingerprint(kind: str, config: dict, own: Path) -> str:
    """Hash of a step's resolved config and of the content of every existing file or folder the config
    names (but its own output folder `own`); `BASE+ADAPTER` references count both parts."""
    inputs = {}
    for value in _strings(config):
        parts = [value] if _exists(value) or "+" not in value else value.split("+")
        found = [Path(p) for p in parts if p != str(own) and _exists(p)]
        if found:
            inputs[value] = [content_digest(p) for p in found]
    text = json.dumps({"kind": kind, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _exists(text: str) -> bool:
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # a long prompt is no file name
        return False


def content_digest(path: Path) -> str:
    """sha256 over a file, or over a folder's top-level files (name and content each; subfolders such as
    checkpoints are not inputs). Weights are hashed whole: retrained weights keep their names, shapes and
    therefore their safetensors headers, so only the bytes tell them apart."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file_sha256(file)}\0".encode())
    return digest.hexdigest()


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def print_plan(plan: list[Planned], recipe: Recipe, root: Path, console: Console) -> None:
    """The dry run: each step, whether it runs, its guessed time and memory, and what the guess rests on."""
    table = Table(title=f"plan (estimated): {recipe.description or 'recipe'}")
    for column in ("#", "step", "kind", "runs", "time", "peak RSS"):
        table.add_column(column, justify="right" if column.startswith(("#", "est")) else "left", no_wrap=True)
    total = 0.0
    for index, item in enumerate(plan, 1):
        total += item.estimate.seconds if item.runs else 0.0
        table.add_row(
            str(index),
            item.step.name,
            item.step.kind,
            item.reason if item.runs else "no: kept",
            _duration(item.estimate.seconds),
            f"{item.estimate.peak_bytes / 1e9:.1f} GB",
        )
    console.print(table)
    for index, item in enumerate(plan, 1):
        console.print(f"[dim]{index:>3}. {item.step.name}: {item.estimate.basis}[/dim]", highlight=False)
    console.print(f"estimated total: {_duration(total)} for {sum(p.runs for p in plan)} of {len(plan)} steps -> {root}")
    console.print(f"[dim]{ESTIMATE_NOTE}[/dim]")


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _read_state(root: Path) -> dict:
    path = root / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))["steps"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged: delete it (every step then reruns) or pass --overwrite") from None


def _refuse_foreign_outputs(plan: list[Planned], root: Path, state: dict, overwrite: bool) -> None:
    """Before anything runs: an output folder this recipe did not write is never replaced silently."""
    if overwrite:
        return
    for item in plan:
        target = root / item.step.name
        if item.runs and target.exists() and item.step.name not in state:
            raise UserError(
                f"{target} exists but {root / STATE_FILE} does not record it: pass --overwrite or choose another --out"
            )


def _execute(step: Step, kind: Kind, config_file: Path, output: Path, overwrite: bool, isolate: bool) -> Path:
    """Run one step: in a child process (stderr teed to OUTPUT/steps/NAME.log) or, with isolate=False, here."""
    if not isolate:
        return Path(kind.run(config_file, output, overwrite))
    result_file = config_file.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "lmforge.recipe.runner", step.kind, str(config_file), str(output)]
    command += ["--result", str(result_file)] + (["--overwrite"] if overwrite else [])
    last = ""
    with (
        open(config_file.with_suffix(".log"), "w", encoding="utf-8") as log_file,
        subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1) as child,
    ):
        for line in child.stderr:
            sys.stderr.write(line)
            log_file.write(line)
            last = line.strip() or last
    if child.returncode == 2 and last.startswith("lmforge: error: "):
        raise UserError(f"step '{step.name}' ({step.kind}): {last.removeprefix('lmforge: error: ')}")
    if child.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"step '{step.name}' ({step.kind}) failed (exit {child.returncode}): see {log_file.name}")
    return Path(json.loads(result_file.read_text())["output"])


def _child_main(argv: list[str] | None = None) -> None:
    """The child process: run one built-in step kind on its config file, write where its output went."""
    parser = argparse.ArgumentParser(prog="lmforge.recipe.runner")
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("config", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logs.configure()
    try:
        output = KINDS[args.kind].run(args.config, args.output, args.overwrite)
    except UserError as err:
        print(f"lmforge: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    args.result.write_text(json.dumps({"output": str(output), "pid": os.getpid()}), encoding="utf-8")


if __name__ == "__main__":
    _child_main()
