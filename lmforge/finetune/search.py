"""`lmforge tune`: hyperparameter search over SFT runs with Optuna, resumable from a SQLite study.

Each trial is one `run_sft` with sampled `key=value` overrides, written to `<output>/trials/trial-N`; the
base model is loaded once per study and reused (LoRA unloads its adapter after each trial). Sampling is
TPE (Bergstra et al. 2011, https://papers.nips.cc/paper/4443; Optuna, Akiba et al. 2019,
https://arxiv.org/abs/1907.10902), seeded; a MedianPruner stops trials whose periodic validation loss
falls behind the median of earlier trials at the same step. The study lives in `<output>/study.db` unless
`study` names another file, so `resume: true` continues it up to `trials` in total: trials that completed or
were pruned count, a failed or interrupted one does not (it is run again). The base model is scored once
per study (kept in the study, for the forgetting report of every trial), not once per trial. The best trial's
folder is copied to `<output>/best` with a run.json of command "tune". With `top_k_soup: k` the k best
trials are also averaged weight by weight (a model soup, Wortsman et al. 2022, https://arxiv.org/abs/2203.05482)
by the merge engine into `<output>/soup`, and its validation loss is reported beside the best trial's, so
the soup is kept only on the evidence.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from rich.console import Console
from rich.table import Table

from lmforge import config as config_io
from lmforge.data.sources import split_records
from lmforge.errors import UserError
from lmforge.eval.forgetting import report_tasks, score
from lmforge.finetune.sft import SFTConfig, run_sft
from lmforge.models.load import load_model
from lmforge.outputs import staged_output
from lmforge.report.record import RunMeter, read_run, run_record, write_json

log = logging.getLogger("lmforge.tune")
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
"""Trial states that count towards `trials`: a failed or interrupted trial is run again."""


@dataclass(frozen=True)
class SearchSpace:
    """What each trial samples; a null entry keeps the config's own value (LoRA entries are skipped for full)."""

    lr: tuple[float, float] | None = (1e-5, 3e-3)
    """train.lr, log-uniform in [low, high]."""
    lora_r: list[int] | None = field(default_factory=lambda: [4, 8, 16, 32])
    """lora.r, one of these."""
    lora_alpha_ratio: list[float] | None = field(default_factory=lambda: [1.0, 2.0])
    """lora.alpha as a multiple of the sampled lora.r, one of these."""
    lora_dropout: tuple[float, float] | None = (0.0, 0.1)
    """lora.dropout, uniform in [low, high]."""
    max_steps: tuple[int, int] | None = (50, 200)
    """train.max_steps, an integer in [low, high]."""


@dataclass(frozen=True)
class TuneConfig(SFTConfig):
    """A search: the SFT config's fields (output is the study folder; resume continues the study) plus these."""

    trials: int = 20
    """Trials in the study in total; with resume, only the missing ones run."""
    study: str | None = None
    """SQLite file holding the study (default <output>/study.db)."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """The search space; narrow it, or null an entry to keep the config's value."""
    metric: Literal["val_loss"] = "val_loss"
    """Minimised: the best validation loss of a trial (needs data.val_fraction > 0)."""
    prune: bool = True
    """Stop unpromising trials early (median rule; set train.eval_every to report mid-run)."""
    top_k_soup: int = 0
    """Also average the k best trials' weights into <output>/soup (linear merge) and score it (0: no soup)."""


@dataclass(frozen=True)
class TuneResults:
    """What a search found: the exported folder, the best trial and a row per trial."""

    best: Path
    best_trial: int
    best_value: float
    best_params: dict
    trials: list[dict]
    soup: Path | None = None
    soup_value: float | None = None


def sample_overrides(trial: optuna.Trial, space: SearchSpace, lora: bool = True) -> list[str]:
    """Draw one point of `space` from `trial` as SFT `key=value` overrides (LoRA keys only when `lora`)."""
    out = []
    if space.lr is not None:
        out.append(f"train.lr={trial.suggest_float('lr', *space.lr, log=True)!r}")
    if space.max_steps is not None:
        out.append(f"train.max_steps={trial.suggest_int('max_steps', *space.max_steps)}")
    if lora and space.lora_r is not None:
        r = trial.suggest_categorical("lora_r", list(space.lora_r))
        out.append(f"lora.r={r}")
        if space.lora_alpha_ratio is not None:  # alpha tracks r, so the update scale alpha/r is what is searched
            ratio = trial.suggest_categorical("lora_alpha_ratio", list(space.lora_alpha_ratio))
            out.append(f"lora.alpha={float(r * ratio)!r}")
    if lora and space.lora_dropout is not None:
        out.append(f"lora.dropout={trial.suggest_float('lora_dropout', *space.lora_dropout)!r}")
    return out


def tune(
    config: str | Path | Mapping[str, Any] | TuneConfig | None = None, overrides: Sequence[str] = (), **settings: Any
) -> TuneResults:
    """Search SFT hyperparameters and export the best trial; a config as `finetune` takes it, plus the search keys.

    Args:
        config: a YAML file, a dict of the same keys, a TuneConfig, or None (defaults).
        overrides: "key.sub=value" strings, as on the command line.
        settings: config keys as keyword arguments, applied last, e.g. trials=4, space={"lr": [1e-4, 1e-3]}.
    """
    return run_tune(config_io.resolve(config, TuneConfig, overrides, **settings))


def run_tune(cfg: TuneConfig, console: Console | None = None) -> TuneResults:
    """Run the missing trials of the study, print the trial table and export the best trial."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its [I ...]/[W ...] lines repeat what lmforge logs
    try:
        return _run_tune(cfg, console)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run_tune(cfg: TuneConfig, console: Console | None) -> TuneResults:
    meter = RunMeter()
    _check(cfg)
    output = Path(cfg.output)
    db = Path(cfg.study) if cfg.study else output / "study.db"
    if not cfg.resume:
        if output.exists() and not cfg.overwrite:
            raise UserError(
                f"output folder {output} exists: set overwrite: true, or resume: true to continue its study"
            )
        shutil.rmtree(output, ignore_errors=True)
        if db.exists():
            raise UserError(f"study {db} exists: set resume: true to continue it, or delete it")
    db.parent.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{db.resolve()}"
    previous = _stored_trials(storage, output.name)
    study = optuna.create_study(
        study_name=output.name,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        # Reseeded past the trials already run, so a resumed study does not replay its first random draws.
        sampler=optuna.samplers.TPESampler(seed=cfg.train.seed + len(previous)),
        pruner=optuna.pruners.MedianPruner() if cfg.prune else optuna.pruners.NopPruner(),
    )
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(stale.number, state=optuna.trial.TrialState.FAIL)  # left by an interrupted run
    base = {f.name: getattr(cfg, f.name) for f in fields(SFTConfig)}
    base_overrides = [f"{k}={json.dumps(v)}" for k, v in config_io.to_dict(SFTConfig(**base)).items()]
    loaded = load_model(cfg.model, quantize=cfg.lora.quantize if cfg.method == "lora" else None)
    base_scores = _base_scores(study, loaded, cfg)

    def objective(trial: optuna.Trial) -> float:
        folder = output / "trials" / f"trial-{trial.number}"
        sampled = sample_overrides(trial, cfg.space, lora=cfg.method == "lora")
        run_cfg = config_io.load(
            None, SFTConfig, base_overrides + sampled + [f"output={folder}", "overwrite=true", "resume=false"]
        )
        losses: list[float] = []
        steps = [0]

        def on_log(entry: dict) -> None:
            steps[0] = entry["step"]
            if "eval" in entry:
                losses.append(entry["eval"][cfg.metric])
                trial.report(losses[-1], entry["step"])
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{cfg.metric} {losses[-1]:.4f} at step {entry['step']}")

        try:
            run_sft(run_cfg, loaded=loaded, on_log=on_log, base_scores=base_scores)
        finally:
            trial.set_user_attr("steps", steps[0])
            shutil.rmtree(f"{folder}.work", ignore_errors=True)  # a pruned or failed trial's checkpoints
        if not losses:
            raise UserError("no validation loss was computed: set data.val_fraction so validation gets records")
        return min(losses)

    failed = 0
    while (missing := cfg.trials - len(study.get_trials(deepcopy=False, states=COUNTED))) > 0:
        started = len(study.get_trials(deepcopy=False))
        study.optimize(objective, n_trials=missing, callbacks=[_log_trial])
        # a trial that ends FAIL without raising (a NaN validation loss) is run again, but not forever
        failed += sum(t.state == optuna.trial.TrialState.FAIL for t in study.get_trials(deepcopy=False)[started:])
        if failed >= cfg.trials:
            raise UserError(
                f"{failed} trials of study {db} failed (NaN validation loss): narrow space.lr, then resume: true"
            )
    (console or Console()).print(trials_table(study))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"no trial of study {db} completed (all pruned or failed): run more trials with resume: true")
    best = study.best_trial
    exported = _export_best(cfg, output / "trials" / f"trial-{best.number}", output / "best", best, db, meter)
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    soup, soup_value = _soup(cfg, complete, output, loaded, console or Console()) if cfg.top_k_soup else (None, None)
    return TuneResults(exported, best.number, float(best.value), dict(best.params), rows, soup, soup_value)


def _soup(cfg: TuneConfig, complete: list, output: Path, loaded, console: Console) -> tuple[Path, float]:
    """Average the top-k trials' weights with the merge engine and score the soup on the validation split."""
    from lmforge.data.prepare import tokenize, training_records
    from lmforge.finetune.sft import validation_loss
    from lmforge.merge.run import merge

    top = sorted(complete, key=lambda t: t.value)[: cfg.top_k_soup]
    if len(top) < cfg.top_k_soup:
        raise UserError(f"top_k_soup={cfg.top_k_soup} but only {len(top)} trials completed: run more trials")
    folders = [output / "trials" / f"trial-{t.number}" for t in top]
    refs = [f"{loaded.folder}+{f}" if (f / "adapter_config.json").is_file() else str(f) for f in folders]
    recipe = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": r, "parameters": {"weight": 1.0}} for r in refs],
    }
    soup = merge(recipe, output / "soup", overwrite=True, progress=False)
    _, val_records = split_records(training_records(cfg.data), cfg.data.val_fraction, cfg.train.seed)
    souped = load_model(soup)
    rows = tokenize(val_records, souped.tokenizer, cfg.data)
    with torch.no_grad():
        value = validation_loss(rows, souped.tokenizer.pad_token_id, cfg.eval.batch_size)(souped.model.eval())
    value = float(value["val_loss"])
    best = top[0].value
    verdict = "better than" if value < best else "not better than"
    console.print(
        f"soup of trials {[t.number for t in top]}: {cfg.metric} {value:.4f}, {verdict} the best trial ({best:.4f})"
    )
    record = read_run(soup)
    record["soup"] = {"trials": [t.number for t in top], "val_loss": value, "best_trial_val_loss": best}
    write_json(soup / "run.json", record)
    return soup, value


def _stored_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The trials already stored under `name` (none for a new study)."""
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return []


def trials_table(study: optuna.Study) -> Table:
    """One row per trial: number, state, sampled params, best val_loss (last reported if pruned), steps."""
    table = Table(title=f"study {study.study_name}")
    for column in ("trial", "state", "params", "val_loss", "steps"):
        table.add_column(column, justify="right" if column in ("trial", "val_loss", "steps") else "left")
    for row in map(_row, study.get_trials(deepcopy=False)):
        params = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items())
        loss = "" if row["val_loss"] is None else f"{row['val_loss']:.4f}"
        table.add_row(str(row["number"]), row["state"], params, loss, str(row["steps"] or ""))
    return table


def _base_scores(study: optuna.Study, loaded, cfg: TuneConfig) -> dict | None:
    """The base model's scores on the report's tasks: computed once per study and kept in it, so neither the
    trials nor a resumed run score the base again (unless the base model or the eval settings changed)."""
    tasks = report_tasks(cfg.eval, cfg.data.task)
    key = json.dumps([cfg.model, str(loaded.folder), tasks, config_io.to_dict(cfg.eval)], sort_keys=True)
    kept = study.user_attrs.get("base_scores")
    if kept is None or kept["key"] != key:
        scores = score(loaded, tasks, cfg.eval)
        kept = {"key": key, "scores": None if scores is None else {"results": scores["results"]}}
        study.set_user_attr("base_scores", kept)
    return kept["scores"]


def _log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial (in place of Optuna's own log lines)."""
    row = _row(trial)
    if trial.state == optuna.trial.TrialState.COMPLETE:
        best = study.best_trial
        log.info(
            "trial %d: val_loss %.4f (best: trial %d, %.4f)", trial.number, row["val_loss"], best.number, best.value
        )
    elif trial.state == optuna.trial.TrialState.PRUNED:
        log.info("trial %d pruned at step %s", trial.number, row["steps"])
    else:
        log.warning("trial %d failed (%s): it does not count towards trials", trial.number, trial.state.name)


def _row(t: optuna.trial.FrozenTrial) -> dict:
    """A trial's table row; a failed or interrupted trial shows no val_loss, a pruned one its last report."""
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    pruned = t.state == optuna.trial.TrialState.PRUNED
    value = t.value if t.state == optuna.trial.TrialState.COMPLETE else last if pruned else None
    return {
        "number": t.number,
        "state": t.state.name,
        "params": t.params,
        "val_loss": value,
        "steps": t.user_attrs.get("steps"),
    }


def _check(cfg: TuneConfig) -> None:
    """One-line errors for settings a search cannot run with."""
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if processes > 1:  # each rank would draw its own trial from the shared study and train it with the others
        raise UserError(
            f"lmforge tune runs its trials in one process, not {processes}: run it without accelerate launch or "
            "torchrun (finetune, dpo and distill take several processes)"
        )
    if cfg.trials < 1:
        raise UserError(f"trials must be >= 1, got {cfg.trials}")
    if cfg.top_k_soup == 1 or cfg.top_k_soup < 0 or cfg.top_k_soup > cfg.trials:
        raise UserError(f"top_k_soup must be 0 (no soup) or 2..trials ({cfg.trials}), got {cfg.top_k_soup}")
    if cfg.data.val_fraction <= 0:
        raise UserError("tuning minimises validation loss: set data.val_fraction > 0")
    space = cfg.space
    for name in ("lr", "lora_dropout", "max_steps"):
        bounds = getattr(space, name)
        if bounds is not None and not bounds[0] <= bounds[1]:
            raise UserError(f"space.{name} must be [low, high] with low <= high, got {list(bounds)}")
    if space.lr is not None and space.lr[0] <= 0:
        raise UserError(f"space.lr must be > 0 (it is sampled log-uniformly), got {list(space.lr)}")
    if space.max_steps is not None and space.max_steps[0] < 1:
        raise UserError(f"space.max_steps must be >= 1, got {list(space.max_steps)}")
    for name in ("lora_r", "lora_alpha_ratio"):
        if getattr(space, name) == []:
            raise UserError(f"space.{name} is empty: list some values, or null to keep the config's value")


def _export_best(cfg, trial_folder: Path, target: Path, best, db: Path, meter: RunMeter) -> Path:
    """Copy the best trial's model folder; its run.json becomes the search's record (the trial's is nested)."""
    trial_record = read_run(trial_folder)
    with staged_output(target, overwrite=True) as staging:
        shutil.copytree(trial_folder, staging, dirs_exist_ok=True)
        keep = ("inputs", "data", "tokens_seen", "params_total", "params_trainable", "metrics")
        record = run_record(
            "tune", f"tpe-{cfg.method}", meter, config=config_io.to_dict(cfg), **{k: trial_record[k] for k in keep}
        )
        record["study"] = {"path": str(db), "trials": cfg.trials, "best_trial": best.number, "best_value": best.value}
        record["best_params"] = best.params
        record["trial_record"] = trial_record
        write_json(staging / "run.json", record)
    return target
