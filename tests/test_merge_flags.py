"""`lmforge merge` with mergekit-yaml's flags, through the CLI: a flag with no lmforge counterpart prints one line
saying why and the merge comes out bit for bit as without it; a flag whose setting would change the output stops
the command with one line and exit status 2; a mergekit-only config parameter (int8_mask) is noted the same way."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from cli_helpers import run_cli
from merge_helpers import edit_config, family, weights

from lmforge.merge.run import merge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family(tmp_path_factory.mktemp("merge_flags"), count=3)


@pytest.fixture(scope="module")
def stacked(models, tmp_path_factory):
    """A passthrough config that uses layer 0 twice (what mergekit's --clone-tensors is for), and its merge."""
    folder = tmp_path_factory.mktemp("stacked")
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(models[1]), "layer_range": [0, 1]}]},
            {"sources": [{"model": str(models[1]), "layer_range": [0, 2]}]},
        ],
    }
    (folder / "stack.yaml").write_text(yaml.safe_dump(config))
    return folder / "stack.yaml", weights(merge(config, folder / "plain", progress=False))


# each flag, and words of the reason its line must give
NO_EFFECT = [
    (["--lazy-unpickle"], "never unpickles"),
    (["--allow-crimes"], "one architecture only"),
    (["--cuda"], "the merge runs on the CPU"),
    (["--low-cpu-memory"], "streams tensor by tensor"),
    (["--clone-tensors"], "a layer used twice is stored twice"),
    (["--read-to-gpu"], "read into CPU memory"),
    (["--multi-gpu"], "--num-threads worker threads"),
    (["--gpu-rich"], "--cuda --low-cpu-memory --read-to-gpu --multi-gpu"),
    (["--async-write"], "writes its tensor as soon as it is merged"),
    (["--write-threads", "4"], "set --num-threads"),
    (["--device", "cuda"], "the merge runs on the CPU"),
    (["--lora-merge-cache", "/nonexistent/lora"], "LMFORGE_CACHE"),
    (["--transformers-cache", "/nonexistent/hf"], "HF_HUB_CACHE"),
    (["-v"], "no more detailed merge log"),
]


@pytest.mark.parametrize(("flag", "reason"), NO_EFFECT, ids=[f[0][0] for f in NO_EFFECT])
def test_a_flag_with_no_effect_says_why_and_the_merge_is_unchanged(
    monkeypatch, capsys, tmp_path, stacked, flag, reason
):
    config, plain = stacked
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(config), str(out), "--quiet", *flag)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "has no effect" in line]
    assert len(notes) == 1 and notes[0].startswith(f"lmforge: {flag[0]} has no effect: ") and reason in notes[0], err
    merged = weights(out)
    assert merged.keys() == plain.keys() and all(torch.equal(merged[k], plain[k]) for k in plain)
    name = "model.layers.{}.mlp.up_proj.weight"
    assert torch.equal(merged[name.format(0)], merged[name.format(1)])  # layer 0, stored once per use


@pytest.mark.parametrize(
    "flags", [["--copy-tokenizer", "--write-model-card", "--safe-serialization"], ["--lora-merge-dtype", "float32"]]
)
def test_flags_that_say_what_lmforge_does_anyway_pass_silently(monkeypatch, capsys, tmp_path, stacked, flags):
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(stacked[0]), str(out), "--quiet", *flags)
    assert code == 0 and "has no effect" not in err, err
    assert all((out / f).is_file() for f in ("tokenizer.json", "README.md", "model.safetensors"))
    assert not list(out.glob("*.bin"))


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--no-copy-tokenizer"], "always writes the output's tokenizer"),
        (["--no-write-model-card"], "always writes README.md"),
        (["--no-safe-serialization"], "safetensors only"),
        (["--lora-merge-dtype", "bfloat16"], "--lora-merge-dtype bfloat16: lmforge applies adapters in float32 only"),
        (["--trust-remote-code"], "never runs model code"),
    ],
)
def test_a_flag_that_would_change_the_output_is_refused(monkeypatch, capsys, tmp_path, stacked, flags, words):
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(stacked[0]), str(out), "--quiet", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"lmforge: error: {flags[0]}"), err
    assert words in lines[0] and not out.exists()


def test_allow_crimes_still_refuses_mixed_architectures(monkeypatch, capsys, tmp_path, models):
    other = shutil.copytree(models[2], tmp_path / "mistral")
    edit_config(other, model_type="mistral", architectures=["MistralForCausalLM"])
    config = tmp_path / "crime.yaml"
    config.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "parameters": {"weight": 1.0}, "models": [str(models[1]), str(other)]}
        )
    )
    code, _, err = run_cli(
        monkeypatch, capsys, "merge", str(config), str(tmp_path / "out"), "--quiet", "--allow-crimes"
    )
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("lmforge: --allow-crimes has no effect"), err
    assert lines[-1].startswith("lmforge: error: different architectures") and not (tmp_path / "out").exists()


def test_int8_mask_is_noted_and_changes_nothing(monkeypatch, capsys, caplog, tmp_path, models):
    ties = {
        "merge_method": "ties",
        "base_model": str(models[0]),
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models[1:]],
    }
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(ties | {"parameters": {"int8_mask": True}}))
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(config), str(tmp_path / "masked"), "--quiet")
    assert code == 0, err
    notes = [r.getMessage() for r in caplog.records if "int8_mask" in r.getMessage()]
    assert len(notes) == 1 and notes[0].startswith(
        f"{config}: parameters.int8_mask has no effect: it only saves memory"
    )
    plain = weights(merge(ties, tmp_path / "plain", progress=False))
    masked = weights(tmp_path / "masked")
    assert all(torch.equal(masked[k], plain[k]) for k in plain)
