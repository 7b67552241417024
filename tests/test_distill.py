"""`lmforge distill` end to end on tiny models: outputs, side-by-side report, resume, LoRA, CLI, bad inputs."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from cli_helpers import run_cli

from lmforge import config as config_io
from lmforge.distill import run as distill_run
from lmforge.distill.run import DistillConfig, run_distill
from lmforge.errors import UserError
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_timing_repeat")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("teacher4"), layers=4, seed=0)


def make_cfg(teacher, out, *overrides):
    base = [
        f"teacher={teacher}",
        f"output={out}",
        "student_layers=2",
        "data.task=dates",
        "data.limit=40",
        "train.max_steps=6",
        "train.batch_size=8",
        "train.lr=5e-3",
        "train.save_every=100",
        "eval.limit=2",
        "eval.batch_size=2",
        "eval.probe=false",
    ]
    return config_io.load(None, DistillConfig, base + list(overrides))


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory):
    return run_distill(make_cfg(teacher, tmp_path_factory.mktemp("runs") / "straight"))


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in line]


def test_distill_writes_a_loadable_student_and_a_side_by_side_record(straight, teacher):
    trained = losses(straight)
    assert len(trained) == 6 and trained[-1] < trained[0]
    record = json.loads((straight / "run.json").read_text())
    assert record["command"] == "distill" and record["method"] == "distill-full-offline"
    assert (
        record["inputs"]["student"]["from_teacher_layers"] == [0, 1]
        or len(record["inputs"]["student"]["from_teacher_layers"]) == 2
    )
    assert set(record["metrics"]) == {"dates"} and set(record["teacher_metrics"]) == {"dates"}
    ratios = record["ratios"]
    assert 0.5 < ratios["params"] < 0.8 and 0.5 < ratios["bytes"] < 0.8
    timed = {who: record["footprint"][who]["ms_per_token"] for who in ("teacher", "student")}
    assert ratios["speedup"] == pytest.approx(timed["teacher"] / timed["student"], abs=1e-3)
    init = record["init_quality"]
    assert init["teacher"]["kl"] == pytest.approx(0, abs=1e-5)
    assert init["student"]["kl"] < init["random_init"]["kl"]  # the teacher's layers start closer than random ones
    assert config_io.load(straight / "lmforge.yaml", DistillConfig).student_layers == 2
    assert "| dates | exact_match |" in (straight / "README.md").read_text()
    assert not (straight.parent / "straight.work").exists()
    student = load_model(straight)
    assert student.model.config.num_hidden_layers == 2
    assert sum(p.numel() for p in student.model.parameters()) == record["params_total"]


def test_resume_after_an_interruption_gives_the_same_run(straight, teacher, tmp_path):
    def kill_at_3(entry):
        if entry.get("step") == 3 and "loss" in entry:
            raise KeyboardInterrupt

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_distill(make_cfg(teacher, out), on_log=kill_at_3)
    assert not out.exists() and (tmp_path / "killed.work" / "checkpoint").is_dir()
    resumed = run_distill(make_cfg(teacher, out, "resume=true"))
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5)


def test_lora_on_a_given_student_merges_into_a_full_model(teacher, tmp_path, caplog):
    bigger = make_tiny_llama(tmp_path / "bigger", layers=6, seed=5)
    with caplog.at_level(logging.WARNING, logger="lmforge.distill"):
        out = run_distill(
            make_cfg(teacher, tmp_path / "lora", f"student={bigger}", "student_layers=null", "method=lora")
        )
    assert "not smaller than the teacher" in caplog.text
    record = json.loads((out / "run.json").read_text())
    assert record["method"] == "distill-lora-offline"
    modules = load_model(bigger).model.named_modules()
    linears = [m for n, m in modules if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    adapter = sum(16 * (m.in_features + m.out_features) for m in linears)  # r 16 on every linear but the head
    assert record["params_trainable"] == adapter
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert load_model(out).model.config.num_hidden_layers == 6


def test_cached_signal_trains_without_the_teacher_in_memory(teacher, tmp_path, monkeypatch):
    seen = []
    original = distill_run.make_loss_fn

    def spy(teacher_model, cache, *args):
        seen.append((teacher_model, cache))
        return original(teacher_model, cache, *args)

    monkeypatch.setattr(distill_run, "make_loss_fn", spy)
    cache = tmp_path / "topk.safetensors"
    cfg = make_cfg(
        teacher, tmp_path / "cached", "signal.kind=cached", "signal.top_k=8", f"signal.cache={cache}",
        "objectives=[{loss: forward_kl, temperature: 2.0}, {loss: ce, weight: 0.5}]",
    )  # fmt: skip
    out = run_distill(cfg)
    assert seen[0][0] is None and seen[0][1] is not None
    assert cache.is_file() and losses(out)[-1] < losses(out)[0]
    stamp = cache.stat().st_mtime_ns
    run_distill(config_io.load(None, DistillConfig, [*_overrides(cfg), "overwrite=true"]))
    assert cache.stat().st_mtime_ns == stamp  # the same teacher, data and settings reuse the file


def test_the_lean_memory_settings_train_the_same_student(teacher, tmp_path, monkeypatch):
    """Cached signal + optimiser in backward + checkpointing + allocator setting (the benchmark's lean run) give
    the student an ordinary unclipped run gives; the allocator is set before the teacher loads."""
    from safetensors.torch import load_file

    calls = []
    monkeypatch.setattr(distill_run, "return_freed_memory_to_os", lambda: calls.append(1) or True)
    common = ["signal.kind=cached", "signal.top_k=8", f"signal.cache={tmp_path / 'topk.safetensors'}",
              "train.max_grad_norm=null", "train.micro_batch_tokens=0"]  # fmt: skip
    lean = ["train.optimizer_in_backward=true", "train.gradient_checkpointing=true", "train.release_memory=true"]
    plain = run_distill(make_cfg(teacher, tmp_path / "plain", *common))
    assert calls == []
    out = run_distill(make_cfg(teacher, tmp_path / "lean", *common, *lean))
    assert calls == [1]
    assert losses(out) == pytest.approx(losses(plain), rel=1e-4) and losses(out)[-1] < losses(out)[0]
    a, b = load_file(plain / "model.safetensors"), load_file(out / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    record = json.loads((out / "run.json").read_text())  # the teacher, timed before training, is in the ratios
    assert record["ratios"]["params"] == pytest.approx(
        record["footprint"]["student"]["params_total"] / record["footprint"]["teacher"]["params_total"], abs=1e-4
    )
    timed = {who: record["footprint"][who]["ms_per_token"] for who in ("teacher", "student")}
    assert record["ratios"]["params"] < 1
    assert record["ratios"]["speedup"] == pytest.approx(timed["teacher"] / timed["student"], abs=1e-3)


def test_a_bf16_teacher_is_timed_as_a_float32_copy_and_left_as_it_was(teacher):
    loaded = load_model(teacher, dtype="bfloat16", device="cpu")
    footprint = distill_run._teacher_footprint(loaded)
    assert loaded.model.dtype == torch.bfloat16  # the training signal still comes from the bf16 model
    assert footprint["params_total"] == sum(p.numel() for p in loaded.model.parameters())
    assert footprint["ms_per_token"] > 0 and footprint["load_s"] == round(loaded.load_s, 3)


def _overrides(cfg):
    return [f"{k}={json.dumps(v)}" for k, v in config_io.to_dict(cfg).items() if not isinstance(v, dict)] + [
        f"{section}.{k}={json.dumps(v)}"
        for section, values in config_io.to_dict(cfg).items()
        if isinstance(values, dict)
        for k, v in values.items()
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objectives=[{loss: forward_kl, temperature: 0}]", "temperature must be > 0"),
        ("objectives=[{loss: jsd, beta: 1.5}]", r"beta must be in \[0, 1\]"),
        ("student_layers=4", "keeps every one"),
        ("student=somewhere", "not both"),
        ("signal.on_policy_fraction=2", "on_policy_fraction"),
        ("train.optimizer_in_backward=true", r"train.max_grad_norm=1.0: set it to null"),
    ],
)
def test_bad_settings_are_one_line_errors(teacher, tmp_path, override, message):
    with pytest.raises(UserError, match=message) as err:
        run_distill(make_cfg(teacher, tmp_path / "bad", override))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.work").exists()


def test_empty_dataset_is_an_error(teacher, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty") as err:
        run_distill(make_cfg(teacher, tmp_path / "x", "data.task=null", f"data.path={empty}"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.work").exists()


def test_a_student_with_another_vocabulary_is_refused_whole_run(teacher, tmp_path, swapped_vocabulary_llama):
    other = swapped_vocabulary_llama
    out = tmp_path / "student"
    with pytest.raises(UserError, match=r"differ at token id \d+") as err:
        run_distill(make_cfg(teacher, out, "student_layers=null", f"student={other}"))
    assert "\n" not in str(err.value)
    assert not out.exists() and not (tmp_path / "student.work").exists()


def test_cli_bad_input_is_one_line(teacher, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", "--teacher", str(teacher), "--task", "dates", "--out", str(tmp_path / "o"),
        "objectives=[{loss: jsd, beta: -1}]",
    )  # fmt: skip
    assert code == 2 and err.strip().startswith("lmforge: error: ") and "beta" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, _ = run_cli(monkeypatch, capsys, "distill", "--help")
    assert code == 0 and "--student-layers" in out


def test_teacher_signal_precision_is_chosen_and_recorded(straight, teacher, tmp_path, monkeypatch):
    import torch

    assert distill_run._signal_dtype("float32", "cuda") == torch.float32
    assert distill_run._signal_dtype("bfloat16", "cpu") == torch.bfloat16
    assert distill_run._signal_dtype("auto", "cuda") == torch.bfloat16
    native = distill_run.native_bf16_cpu()
    straight_record = json.loads((straight / "run.json").read_text())
    assert straight_record["teacher_signal_dtype"] == ("bfloat16" if native else "float32")
    for has_bf16, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(distill_run, "native_bf16_cpu", lambda has_bf16=has_bf16: has_bf16)
        assert distill_run._signal_dtype("auto", "cpu") == want
    out = run_distill(make_cfg(teacher, tmp_path / "fp32", "teacher_dtype=float32", "train.max_steps=2"))
    assert json.loads((out / "run.json").read_text())["teacher_signal_dtype"] == "float32"
