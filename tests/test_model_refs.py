"""Model references from the user's side: a missing path is named before any hub guess, on every command that
takes a model, and an adapter finds its base model from any working directory (or names it as its base)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from lmforge import cli
from lmforge.errors import UserError
from lmforge.finetune.lora import LoraSettings, attach_lora
from lmforge.merge.run import resolve_input
from lmforge.models import load
from lmforge.models.load import LoadedModel, load_model

IDS = torch.tensor([[1, 40, 41, 42, 100, 200, 2]])


def one_error_line(code: int, err: str) -> str:
    """The text after 'lmforge: error: ' of the single stderr line a user mistake must give (exit 2)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("lmforge: error: ")
    return lines[0].removeprefix("lmforge: error: ")


def logits(loaded: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(IDS).logits


# --- a missing path is named first, by every command that takes a model -------------------------------------


@pytest.mark.parametrize(
    ("ref", "hub"),
    [("sft-dates", False), ("runs/sft-dates", True), ("runs/sft-dates/final", False), ("./runs/sft-dates", False)],
)
def test_eval_of_missing_path_is_one_line(monkeypatch, capsys, tmp_path, ref, hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_error_line(*run_cli(monkeypatch, capsys, "eval", ref, "--task", "dates")[::2])
    assert message.startswith(f"no folder {ref} here (not found in {tmp_path})")
    assert ("if you meant the hub model" in message) == hub


def test_eval_of_missing_path_online_says_it_is_not_here_before_the_hub(tmp_path):
    """Online, `runs/sft-dates` is tried on the hub, but the user hears first that no such folder is here.
    The hub endpoint is a closed local port, so nothing leaves the machine."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "eval", "runs/sft-dates", "--task", "dates"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    message = one_error_line(result.returncode, result.stderr)
    assert message.startswith(
        f"no folder runs/sft-dates here (not found in {tmp_path}), and the hub model runs/sft-dates could not be "
        "downloaded"
    )
    assert result.stdout.startswith("lmforge: no folder runs/sft-dates here: downloading the hub model")


@pytest.mark.parametrize("ref", ["runs/sft-dates", "runs/sft-dates/final"])
def test_merge_inputs_resolve_like_load_model(monkeypatch, tmp_path, ref):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as from_merge:
        resolve_input(ref)
    with pytest.raises(UserError) as from_load:
        load_model(ref)
    assert str(from_merge.value) == str(from_load.value)
    assert str(from_merge.value).startswith(f"no folder {ref} here")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_distill_teacher_and_student_refs_resolve_like_load_model(monkeypatch, capsys, tmp_path, tiny_llama, role):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = {"teacher": "runs/sft-dates", "student": None} if role == "teacher" else {"student": "runs/sft-dates"}
    flags = [f"--{k}={v if v else ''}" for k, v in refs.items() if v]
    if role == "student":
        flags.append(f"--teacher={tiny_llama}")
    code, _, err = run_cli(monkeypatch, capsys, "distill", *flags, "--task", "dates", "data.limit=8", "--out", "o")
    message = one_error_line(code, err)
    assert message.startswith("no folder runs/sft-dates here (not found in")
    assert message.endswith("if you meant the hub model runs/sft-dates, unset HF_HUB_OFFLINE and it will be downloaded")


# --- adapters find their base --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    """A folder where `lmforge finetune --model tiny_a --out runs/x` ran, with tiny_a given relative to it."""
    work = tmp_path_factory.mktemp("work")
    shutil.copytree(tiny_llama, work / "tiny_a")
    args = ["lmforge", "finetune", "model=tiny_a", "data.limit=24", "eval.limit=2", "eval.probe=false"]
    args += ["--task", "dates", "--out", "runs/x", "--steps", "3", "--lr", "3e-2"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setattr(sys, "argv", args)
        try:
            cli.main()
        except SystemExit as exit_:
            assert not exit_.code, "finetune failed"
    return work


def test_adapter_records_its_base_as_an_absolute_folder(trained):
    config = json.loads((trained / "runs" / "x" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((trained / "tiny_a").resolve())


def test_adapter_loads_from_another_working_directory(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    here = logits(load_model("runs/x", device="cpu"))
    assert not torch.allclose(here, logits(load_model("tiny_a", device="cpu")))  # the adapter changed something
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    torch.testing.assert_close(logits(load_model(trained / "runs" / "x", device="cpu")), here)
    code, out, err = run_cli(
        monkeypatch, capsys, "eval", str(trained / "runs" / "x"), "--task", "dates", "--limit", "2"
    )
    assert code == 0, err
    assert "exact_match" in out


def adapter_copy(trained: Path, where: Path, base: str) -> Path:
    """The trained adapter copied to `where`, its recorded base replaced by `base` (a moved or older base)."""
    shutil.copytree(trained / "runs" / "x", where)
    config_file = where / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base
    config_file.write_text(json.dumps(config))
    return where


def test_base_written_relative_to_the_adapter_is_found(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(trained)
    want = logits(load_model("runs/x", device="cpu"))
    shutil.copytree(trained / "tiny_a", tmp_path / "models" / "tiny_a")
    adapter = adapter_copy(trained, tmp_path / "models" / "adapters" / "x", "../../tiny_a")
    monkeypatch.chdir(tmp_path / "models" / "adapters")
    torch.testing.assert_close(logits(load_model(adapter, device="cpu")), want)


def test_old_relative_base_from_the_training_folder_still_loads(trained, tmp_path, monkeypatch):
    adapter = adapter_copy(trained, tmp_path / "x", "tiny_a")  # what adapters trained before this fix hold
    monkeypatch.chdir(trained)
    torch.testing.assert_close(logits(load_model(adapter, device="cpu")), logits(load_model("runs/x", device="cpu")))


@pytest.mark.parametrize("base", ["tiny_a", "moved"])
def test_missing_base_is_named_as_the_adapters_base(trained, tmp_path, monkeypatch, capsys, base):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if base == "moved":
        base = str(tmp_path / "gone" / "tiny_a")
    adapter = adapter_copy(trained, tmp_path / "x", base)
    monkeypatch.chdir(elsewhere)
    looked = f"{base}" if Path(base).is_absolute() else f"{elsewhere / base}, {adapter / base}"
    expected = f"adapter {adapter}: its base model {base} was not found (looked in {looked})"
    with pytest.raises(UserError) as err:
        load_model(adapter)
    assert str(err.value).startswith(expected) and f"base_model_name_or_path in {adapter}" in str(err.value)
    with pytest.raises(UserError) as from_merge:
        resolve_input(str(adapter))
    assert str(from_merge.value) == str(err.value)
    message = one_error_line(*run_cli(monkeypatch, capsys, "eval", str(adapter), "--task", "dates")[::2])
    assert message.startswith(expected)


def save_adapter(loaded: LoadedModel, out: Path, seed: int) -> Path:
    """A LoRA adapter on `loaded` with random (nonzero) B matrices, saved by PEFT as training would."""
    model = attach_lora(loaded.model, LoraSettings(r=2))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(out)
    return out


def test_adapter_on_an_adapter_records_the_first_adapter(tiny_llama, tmp_path):
    """A second adapter trained on a loaded (merged) adapter must name that adapter as its base: naming the bare
    base model would silently drop the first adapter's update when the second is loaded."""
    from peft import PeftModel

    first = save_adapter(load_model(tiny_llama, device="cpu"), tmp_path / "first", seed=1)
    second = save_adapter(load_model(first, device="cpu"), tmp_path / "second", seed=2)
    config = json.loads((second / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(first.resolve())
    both = PeftModel.from_pretrained(load_model(first, device="cpu").model, second).merge_and_unload().eval()
    with torch.no_grad():
        want = both(IDS).logits
    torch.testing.assert_close(logits(load_model(second, device="cpu")), want)
    merged_folder = resolve_input(str(second))  # merge inputs apply the chain too
    torch.testing.assert_close(logits(load_model(merged_folder, device="cpu")), want, atol=1e-5, rtol=1e-5)


def test_default_base_is_rebuilt_when_its_cache_is_cleared(tiny_gguf, tmp_path, monkeypatch):
    """`default` loads a converted GGUF folder from the cache, and adapters record that folder; the tiny GGUF
    stands in for the SmolLM2 wheel's file (the real one: test_default_base_survives_a_cleared_cache)."""
    monkeypatch.setattr(load, "default_gguf_path", lambda: tiny_gguf)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    base = load_model("default", device="cpu")
    adapter = save_adapter(base, tmp_path / "adapter", seed=3)
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base.folder.resolve())
    want = logits(load_model(adapter, device="cpu"))
    shutil.rmtree(tmp_path / "cache")
    torch.testing.assert_close(logits(load_model(adapter, device="cpu")), want)
    assert (base.folder / "config.json").is_file()


@pytest.mark.slow
def test_default_base_survives_a_cleared_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    base = load_model("default", device="cpu")
    adapter = save_adapter(base, tmp_path / "adapter", seed=4)
    recorded = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert recorded == base.folder.resolve() and recorded.is_absolute()
    want = logits(load_model(adapter, device="cpu"))
    shutil.rmtree(tmp_path / "cache")
    torch.testing.assert_close(logits(load_model(adapter, device="cpu")), want)
