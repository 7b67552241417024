"""`lmforge tune` counts only trials that ran to the end (or were pruned), and scores the base model once.

Evaluations are counted from the log lines the real `evaluate` writes ("scoring TASK: ..."), so the count
is of real calls through the real code path; the interruption is a KeyboardInterrupt raised from the
training loop's own log callback, where a Ctrl-C would land.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from rich.console import Console

from lmforge import config as config_io
from lmforge.finetune import search
from lmforge.finetune.search import TuneConfig, run_tune, trials_table


def make_cfg(tiny_llama, tmp_path, *overrides):
    base = [
        f"model={tiny_llama}",
        f"output={tmp_path / 'tune'}",
        "data.task=dates",
        "data.limit=32",
        "data.val_fraction=0.25",
        "train.batch_size=8",
        "train.eval_every=1",
        "space.max_steps=[2, 2]",
        "space.lr=[1e-3, 1e-2]",
        "space.lora_r=[4]",
        "eval.limit=2",
        "eval.batch_size=2",
        "eval.probe=false",
        "prune=false",
    ]
    return config_io.load(None, TuneConfig, base + list(overrides))


def scorings(caplog) -> int:
    count = sum(r.name.startswith("lmforge") and r.getMessage().startswith("scoring dates:") for r in caplog.records)
    caplog.clear()
    return count


def test_the_base_model_is_scored_once_per_study(tiny_llama, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmforge")
    results = run_tune(make_cfg(tiny_llama, tmp_path, "trials=3"))
    assert [r["state"] for r in results.trials] == ["COMPLETE"] * 3
    assert scorings(caplog) == 1 + 3  # the base once, each trained trial once

    records = [json.loads((tmp_path / "tune" / "trials" / f"trial-{n}" / "run.json").read_text()) for n in range(3)]
    assert records[0]["base_metrics"]["dates"]  # every trial still reports against the base
    assert all(r["base_metrics"] == records[0]["base_metrics"] for r in records)

    run_tune(make_cfg(tiny_llama, tmp_path, "trials=4", "resume=true"))
    assert scorings(caplog) == 1  # the new trial only: the base's scores are kept in the study


def test_an_interrupted_trial_does_not_count_and_shows_no_val_loss(tiny_llama, tmp_path, monkeypatch):
    real_run_sft, calls = search.run_sft, []

    def interrupt_the_second_trial(run_cfg, *args, on_log=None, **kwargs):
        calls.append(run_cfg.output)

        def ctrl_c_after_the_first_evaluation(entry):
            on_log(entry)  # the trial has reported a validation loss before the interruption
            if "eval" in entry:
                raise KeyboardInterrupt

        interrupting = ctrl_c_after_the_first_evaluation if len(calls) == 2 else on_log
        return real_run_sft(run_cfg, *args, on_log=interrupting, **kwargs)

    monkeypatch.setattr(search, "run_sft", interrupt_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        run_tune(make_cfg(tiny_llama, tmp_path, "trials=3"))
    monkeypatch.setattr(search, "run_sft", real_run_sft)

    results = run_tune(make_cfg(tiny_llama, tmp_path, "trials=3", "resume=true"))
    states = [r["state"] for r in results.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # three counted trials, the failed one rerun
    assert results.trials[1]["val_loss"] is None
    assert all(r["val_loss"] > 0 for r in results.trials if r["state"] == "COMPLETE")

    import optuna

    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(trials_table(study))
    failed_row = next(line for line in console.export_text().splitlines() if " FAIL " in line)
    assert "." not in failed_row.split("FAIL", 1)[1].split("│")[2]  # the val_loss cell is empty
