"""`lmforge tune` on a tiny model: study file, resume, pruning, the search space, bad settings."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.finetune.search import SearchSpace, TuneConfig, run_tune, sample_overrides
from lmforge.finetune.sft import SFTConfig
from lmforge.models.compat import checkpointing_rename_quiet
from lmforge.models.load import load_model


def make_cfg(tiny_llama, tmp_path, *overrides):
    base = [
        f"model={tiny_llama}",
        f"output={tmp_path / 'tune'}",
        "data.task=dates",
        "data.limit=48",
        "data.val_fraction=0.2",
        "train.batch_size=8",
        "train.eval_every=1",
        "space.max_steps=[3, 3]",
        "space.lr=[1e-3, 1e-2]",
        "eval.limit=2",
        "eval.batch_size=2",
        "eval.probe=false",
        "trials=3",
    ]
    return config_io.load(None, TuneConfig, base + list(overrides))


def test_study_resume_and_best_export(tiny_llama, tmp_path):
    results = run_tune(make_cfg(tiny_llama, tmp_path))
    out = tmp_path / "tune"
    assert (out / "study.db").is_file()
    assert [r["state"] for r in results.trials] == ["COMPLETE"] * 3
    assert all(r["steps"] == 3 and r["val_loss"] > 0 for r in results.trials)
    assert results.best_value == min(r["val_loss"] for r in results.trials)
    assert (out / "best" / "adapter_model.safetensors").is_file()
    record = json.loads((out / "best" / "run.json").read_text())
    assert record["command"] == "tune" and record["study"]["best_trial"] == results.best_trial
    assert record["best_params"] == results.best_params and "dates" in record["metrics"]
    best_cfg = config_io.load(out / "best" / "lmforge.yaml", SFTConfig)
    assert best_cfg.lora.r == results.best_params["lora_r"]
    assert not list((out / "trials").glob("*.work"))

    more = run_tune(make_cfg(tiny_llama, tmp_path, "trials=4", "resume=true"))
    assert len(more.trials) == 4 and (out / "trials" / "trial-3").is_dir()
    assert more.trials[3]["params"] != more.trials[0]["params"]  # resumed sampling does not replay trial 0


def test_top_k_soup_averages_the_best_trials(tiny_llama, tmp_path):
    from peft import PeftModel

    results = run_tune(make_cfg(tiny_llama, tmp_path, "top_k_soup=2", "space.lora_r=[4]"))
    top = sorted((r for r in results.trials if r["state"] == "COMPLETE"), key=lambda r: r["val_loss"])[:2]
    merged = []
    for row in top:
        adapter = tmp_path / "tune" / "trials" / f"trial-{row['number']}"
        base = load_model(tiny_llama, device="cpu").model
        with checkpointing_rename_quiet():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            merged.append(PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict())
    soup = load_model(results.soup, device="cpu").model.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[0][name], merged[1][name])  # the trials really differ
    torch.testing.assert_close(soup[name], (merged[0][name] + merged[1][name]) / 2, rtol=1e-5, atol=1e-6)
    assert results.soup_value is not None and 0 < results.soup_value < 20
    record = json.loads((results.soup / "run.json").read_text())
    assert record["soup"]["trials"] == [r["number"] for r in top]


def test_pruned_trial_ends_pruned(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    cfg = make_cfg(tiny_llama, tmp_path, "trials=1")
    with pytest.raises(UserError, match="no trial of study .* completed"):
        run_tune(cfg)
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.user_attrs["steps"] == 1
    assert not (tmp_path / "tune" / "trials" / "trial-0.work").exists()


def test_shared_base_is_handed_back_unchanged(tiny_llama, tmp_path):
    from lmforge.finetune.sft import run_sft

    loaded = load_model(tiny_llama, device="cpu")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    sft = [f"model={tiny_llama}", "data.task=dates", "data.limit=24", "train.max_steps=1", "eval.probe=false"]
    sft += ["eval.limit=2", "train.lr=1e-2"]
    for i, method in enumerate(["lora", "full"]):
        cfg = config_io.load(None, SFTConfig, sft + [f"output={tmp_path / str(i)}", f"method={method}"])
        run_sft(cfg, loaded=loaded)
        state = loaded.model.state_dict()
        assert state.keys() == before.keys()
        assert all(torch.equal(state[k].cpu(), before[k]) for k in before)


def test_sample_overrides_stay_inside_the_space():
    space = SearchSpace(lr=(1e-5, 3e-3), lora_r=[4, 8], lora_alpha_ratio=[1.0, 2.0], max_steps=(5, 9))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    for _ in range(40):
        trial = study.ask()
        values = dict(o.split("=", 1) for o in sample_overrides(trial, space))
        lr, r, alpha = float(values["train.lr"]), int(values["lora.r"]), float(values["lora.alpha"])
        assert 1e-5 <= lr <= 3e-3 and r in (4, 8) and alpha / r in (1.0, 2.0)
        assert 0.0 <= float(values["lora.dropout"]) <= 0.1 and 5 <= int(values["train.max_steps"]) <= 9
        study.tell(trial, lr * r)
    full = sample_overrides(study.ask(), SearchSpace(max_steps=None), lora=False)
    assert [o.split("=")[0] for o in full] == ["train.lr"]
    config_io.load(None, SFTConfig, ["output=x", *sample_overrides(study.ask(), space)])  # valid SFT overrides


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["top_k_soup=1"], "top_k_soup must be 0"),
        (["top_k_soup=4"], "top_k_soup must be 0"),
        (["trials=0"], "trials must be >= 1"),
        (["space.lr=[0, 1e-3]"], "space.lr must be > 0"),
        (["data.val_fraction=0"], "data.val_fraction > 0"),
    ],
)
def test_bad_settings(tiny_llama, tmp_path, overrides, fragment):
    with pytest.raises(UserError) as err:
        run_tune(make_cfg(tiny_llama, tmp_path, *overrides))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "tune").exists()
