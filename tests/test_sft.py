"""SFT end to end on a tiny model: LoRA and full, merge verification, outputs, forgetting, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.finetune.sft import SFTConfig, run_sft
from lmforge.models.load import load_model


def make_cfg(tiny_llama, tmp_path, *overrides):
    base = [
        f"model={tiny_llama}",
        f"output={tmp_path / 'out'}",
        "data.task=dates",
        "data.limit=64",
        "train.max_steps=4",
        "train.batch_size=8",
        "train.lr=5e-3",
        "eval.limit=4",
        "eval.batch_size=4",
    ]
    return config_io.load(None, SFTConfig, base + list(overrides))


def test_lora_sft_writes_an_adapter_that_loads(tiny_llama, tmp_path):
    out = run_sft(make_cfg(tiny_llama, tmp_path))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "finetune" and record["method"] == "sft-lora"
    assert 0 < record["params_trainable"] < record["params_total"]
    assert "dates" in record["metrics"] and "probe" in record["base_metrics"]
    assert len((out / "log.jsonl").read_text().splitlines()) >= 4
    assert config_io.load(out / "lmforge.yaml", SFTConfig).train.max_steps == 4
    assert not (tmp_path / "out.work").exists()
    loaded = load_model(out, device="cpu")  # adapter folder -> base + adapter, merged
    base = load_model(tiny_llama, device="cpu")
    ids = torch.tensor([[1, 50, 60, 70]])
    assert not torch.allclose(loaded.model(ids).logits, base.model(ids).logits)


def test_lora_merge_equals_adapter(tiny_llama, tmp_path):
    out = run_sft(make_cfg(tiny_llama, tmp_path, "merge=true"))
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = load_model(out, device="cpu").model
    adapter_out = run_sft(make_cfg(tiny_llama, tmp_path / "b"))
    adapter = load_model(adapter_out, device="cpu").model
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)


def test_full_sft_changes_every_layer(tiny_llama, tmp_path):
    out = run_sft(make_cfg(tiny_llama, tmp_path, "method=full"))
    record = json.loads((out / "run.json").read_text())
    assert record["params_trainable"] == record["params_total"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.lr=0"], "train.lr must be > 0"),
        (["lora.target_modules=[nope_proj]"], "match no linear layer"),
        (["data.task=null"], "exactly one of data.path"),
        (["data.max_length=4"], "no example has trainable tokens"),
    ],
)
def test_bad_inputs(tiny_llama, tmp_path, overrides, fragment):
    with pytest.raises(UserError) as err:
        run_sft(make_cfg(tiny_llama, tmp_path, *overrides))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="overwrite"):
        run_sft(make_cfg(tiny_llama, tmp_path))


def test_unknown_config_key_suggests(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="did you mean 'train.lr'"):
        make_cfg(tiny_llama, tmp_path, "train.lrate=1e-3")
