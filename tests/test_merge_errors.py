"""Bad merge inputs: each is one clear UserError line, and no output folder (or staging folder) is left."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from merge_helpers import edit_config, edit_weights, family, leftovers

from lmforge.errors import UserError
from lmforge.merge.run import merge
from lmforge.models.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return family(tmp_path_factory.mktemp("merge_errors"), count=3)


@pytest.fixture()
def broken(models, tmp_path):
    """A fresh copy of a fine-tune to damage."""
    return shutil.copytree(models[2], tmp_path / "broken")


def _ties(base, a, b, density=0.5) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(a), "parameters": {"weight": 0.5, "density": density}},
            {"model": str(b), "parameters": {"weight": 0.5}},
        ],
    }


def _fails(config, out, *words, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        merge(config, out, progress=False, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not out.exists() and leftovers(out.parent) == []
    return message


def test_shape_mismatch(models, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", hidden=48)
    _fails(_ties(models[0], models[1], wide), tmp_path / "out", "shape mismatch", "model.embed_tokens.weight")


def test_different_architectures(models, broken, tmp_path):
    edit_config(broken, model_type="mistral", architectures=["MistralForCausalLM"])
    _fails(_ties(*models[:2], broken), tmp_path / "out", "different architectures", "mistral")


def test_missing_tensor(models, broken, tmp_path):
    edit_weights(broken, lambda w: {k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k})
    _fails(_ties(*models[:2], broken), tmp_path / "out", "missing tensor model.layers.1.mlp.up_proj.weight")


def test_corrupt_and_truncated_safetensors(models, broken, tmp_path):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _fails(_ties(*models[:2], broken), tmp_path / "out", "truncated safetensors file")
    file.write_bytes(b"\xff" * 64)
    _fails(_ties(*models[:2], broken), tmp_path / "out", "corrupt safetensors file")


def test_nan_weights_name_the_tensor(models, broken, tmp_path):
    def poison(w):
        w["model.layers.0.mlp.down_proj.weight"][3, 4] = float("nan")
        return w

    edit_weights(broken, poison)
    config = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (models[1], broken)],
    }
    _fails(config, tmp_path / "out", "NaN/Inf in input tensor model.layers.0.mlp.down_proj.weight", str(broken))
    out = merge(config, tmp_path / "allowed", progress=False, allow_nonfinite=True)
    assert out.exists()


def test_merge_made_nonfinite(models, tmp_path):
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(models[1]), "parameters": {"weight": 1.0}},
            {"model": str(models[2]), "parameters": {"weight": -1.0}},
        ],
    }
    _fails(config, tmp_path / "out", "the merge produced NaN/Inf", "weights summing to 0")


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_outside_zero_one(models, tmp_path, density):
    _fails(_ties(*models, density=density), tmp_path / "out", f"density {float(density)}", "outside (0, 1]")


def test_layer_range_out_of_bounds(models, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(models[1]), "layer_range": [0, 5]}]}],
    }
    _fails(config, tmp_path / "out", "out of bounds", "has 2 layers")


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="exists: pass --overwrite"):
        merge(_ties(*models), out, progress=False)
    assert merge(_ties(*models), out, overwrite=True, progress=False) == out and (out / "model.safetensors").exists()


def test_disk_full_is_reported_before_any_work(models, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    _fails(_ties(*models), tmp_path / "out", "disk full")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"merge_methd": "ties"}, ["unknown key 'merge_methd'", "did you mean 'merge_method'"]),
        ({"merge_method": "tie"}, ["unknown merge_method 'tie'", "did you mean 'ties'", "dare_ties"]),
        ({"merge_method": "ramplus"}, ["unknown merge_method 'ramplus'", "did you mean 'ramplus_tl'"]),
        ({"parameters": {"densty": 0.5}}, ["unknown parameter 'parameters.densty'", "did you mean 'density'"]),
        ({"parameters": {"density": "high"}}, ["parameters.density", "must be float"]),
        ({"parameters": {"weight": [{"filter": 3, "value": 1}]}}, ["filter must be a string"]),
        ({"base_model": None}, ["ties needs a base_model"]),
    ],
)
def test_config_mistakes_name_the_key_and_the_accepted_names(models, tmp_path, change, words):
    config = _ties(*models) | change
    if "merge_methd" in change:
        del config["merge_method"]
    if change.get("base_model", "") is None:
        del config["base_model"]
    _fails(config, tmp_path / "out", *words)


def test_a_parameter_of_another_method_is_only_warned_about(models, tmp_path, caplog):
    config = _ties(*models) | {"parameters": {"t": 0.5}}  # slerp's parameter: mergekit configs carry such leftovers
    merge(config, tmp_path / "out", progress=False)
    assert "parameters.t is not a parameter of this merge method" in caplog.text


def test_missing_weight_says_where_to_set_it(models, tmp_path):
    config = {
        "merge_method": "linear",
        "models": [{"model": str(models[1])}, {"model": str(models[2]), "parameters": {"weight": 1.0}}],
    }
    _fails(config, tmp_path / "out", "missing parameter 'weight'", str(models[1]))


def test_slerp_takes_exactly_two_models(models, tmp_path):
    config = {
        "merge_method": "slerp",
        "base_model": str(models[0]),
        "models": [{"model": str(m)} for m in models],
        "parameters": {"t": 0.5},
    }
    _fails(config, tmp_path / "out", "slerp takes exactly 2 inputs, got 3")


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [a\n")
    with pytest.raises(UserError, match="bad.yaml: invalid YAML at line"):
        merge(bad, tmp_path / "out")
    with pytest.raises(UserError, match="config file not found"):
        merge(tmp_path / "nope.yaml", tmp_path / "out")


def test_unknown_option(models, tmp_path):
    with pytest.raises(UserError, match="unknown merge option"):
        merge(_ties(*models), tmp_path / "out", sed=3)
