"""SFT end to end on a tiny model: LoRA (rsLoRA, DoRA) and full, merge verification, outputs, bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.finetune.lora import LoraSettings, attach_lora, merge_and_verify
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
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)
    # 4 AdamW steps at lr 5e-3 move each trained tensor by about 1e-2 somewhere; a frozen one moves by 0
    moved = {name: (after[name] - before[name]).abs().max().item() for name in before}
    still = sorted(name for name, gap in moved.items() if gap < 1e-4)
    assert still == [], f"weights left as they were: {still}"
    layers = {name.split(".")[2] for name in before if name.startswith("model.layers.")}
    assert layers == {"0", "1"}  # the tiny llama's two decoder layers, each checked tensor by tensor above


def _lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("rslora, scale", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_rslora_scales_the_update_by_alpha_over_sqrt_r(tiny_llama, rslora, scale):
    model = attach_lora(load_model(tiny_llama, device="cpu").model, LoraSettings(r=4, alpha=8, rslora=rslora))
    layers = _lora_layers(model)
    assert [m.scaling["default"] for m in layers.values()] == pytest.approx([scale] * 14)  # 7 linears x 2 layers
    # and the layer's output really is base(x) + scale * B A x, with B made non-zero
    q = next(m for name, m in layers.items() if name.endswith("layers.0.self_attn.q_proj"))
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(generator=torch.Generator().manual_seed(0))
        x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(q(x) - q.base_layer(x), scale * x @ a.T @ b.T)


def _one_step(folder, dora: bool):
    """One AdamW step of a fresh adapter (seed 0) on one batch: (loss before, logits after, magnitudes)."""
    torch.manual_seed(0)
    model = attach_lora(load_model(folder, device="cpu").model, LoraSettings(r=4, alpha=8, dora=dora))
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_magnitude_vector" in n}
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    trained = {n: p.detach() for n, p in model.named_parameters() if n in magnitudes}
    return loss.item(), logits, magnitudes, trained


def test_dora_step_differs_from_lora_and_trains_the_magnitude(tiny_llama):
    lora_loss, lora_logits, no_magnitudes, _ = _one_step(tiny_llama, dora=False)
    dora_loss, dora_logits, start, trained = _one_step(tiny_llama, dora=True)
    assert no_magnitudes == {} and len(start) == 14
    # B starts at zero, so both start as the base model; DoRA's step also moves the magnitude, LoRA's cannot
    assert dora_loss == pytest.approx(lora_loss)
    assert (dora_logits - lora_logits).abs().max() > 1e-2
    for name in start:
        assert (trained[name] - start[name]).abs().max() > 1e-3, name


def test_sft_config_reaches_peft_rslora_and_dora(tiny_llama, tmp_path):
    """lora.rslora and lora.dora in a run's config give an rsLoRA DoRA adapter whose magnitudes trained."""
    out = run_sft(make_cfg(tiny_llama, tmp_path, "lora.rslora=true", "lora.dora=true", "lora.r=4"))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_rslora"] is True and adapter["use_dora"] is True and adapter["r"] == 4
    saved, base = load_file(out / "adapter_model.safetensors"), load_file(tiny_llama / "model.safetensors")
    magnitudes = {name: t for name, t in saved.items() if "lora_magnitude_vector" in name}
    assert len(magnitudes) == 14
    for name, magnitude in magnitudes.items():  # DoRA starts each magnitude at its weight's row norms
        weight = base[name.removeprefix("base_model.model.").replace("lora_magnitude_vector", "weight")]
        assert (magnitude - torch.linalg.vector_norm(weight, dim=1)).abs().max() > 1e-4, name


def _adapter_with_update(folder, dtype: str):
    torch.manual_seed(0)
    model = attach_lora(load_model(folder, dtype=dtype, device="cpu").model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_merge_refuses_a_merged_model_that_drifts_from_the_adapter(tiny_llama):
    """bfloat16 base weights cannot hold a small update: the merge rounds it away and is refused."""
    ids = torch.tensor([[1, 50, 60, 70, 80, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}
    merged = merge_and_verify(_adapter_with_update(tiny_llama, "float32"), [batch])  # float32 holds it
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    with pytest.raises(UserError) as err:
        merge_and_verify(_adapter_with_update(tiny_llama, "bfloat16"), [batch])
    message = str(err.value)
    assert message.startswith("LoRA merge refused") and "(tolerance 0.001)" in message and "\n" not in message
    assert float(message.split("by up to ")[1].split(" ")[0]) > 1e-3


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
