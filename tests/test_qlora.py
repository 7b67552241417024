"""QLoRA (`lora.quantize: nf4 | int8`) for real on CPU: bitsandbytes 0.50 has a CPU backend.

The base is loaded quantised through bitsandbytes, LoRA trains on it, and `--merge` dequantises the base and
merges the adapter there. The merged model must give the logits of the saved adapter applied to the nf4
base (and not those of the adapter on the float base, which the quantisation changes). A tiny llama of
hidden size 64 is used: bitsandbytes quantises in blocks of 64 values. Refusals are one line, nothing written.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from cli_helpers import run_cli
from needs import tool_missing
from safetensors.torch import load_file

from lmforge.models import quantize
from lmforge.models.load import load_model
from lmforge.models.tiny import make_tiny_llama

QUICK = ["--steps", "3", "train.batch_size=4", "train.lr=1e-2", "train.save_every=100", "eval.probe=false"]
QUICK += ["eval.limit=4", "data.limit=8"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    if importlib.util.find_spec("bitsandbytes") is None:
        tool_missing("bitsandbytes is not installed (pip install 'lmforge[qlora]')")
    return make_tiny_llama(tmp_path_factory.mktemp("qlora_base"), hidden=64, intermediate=128, seed=4)


def finetune(monkeypatch, capsys, base, out, *extra: str) -> None:
    args = ["finetune", "--model", str(base), "--task", "dates", "--out", str(out), *QUICK, *extra]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_nf4_trains_and_the_merge_equals_the_adapter_on_the_nf4_base(monkeypatch, capsys, base, tmp_path):
    from peft import PeftModel

    finetune(monkeypatch, capsys, base, tmp_path / "adapter", "lora.quantize=nf4")
    finetune(monkeypatch, capsys, base, tmp_path / "merged", "lora.quantize=nf4", "--merge")
    record = json.loads((tmp_path / "adapter" / "run.json").read_text())
    assert record["config"]["lora"]["quantize"] == "nf4"
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items()), "nothing trained"

    ids = torch.tensor([[3, 40, 71, 9, 120, 55, 8, 200]])
    merged = load_model(tmp_path / "merged", device="cpu").model
    assert not quantize.is_quantized(merged)
    nf4_base = quantize.prepare_for_training(load_model(base, device="cpu", quantize="nf4").model)
    on_nf4 = PeftModel.from_pretrained(nf4_base, tmp_path / "adapter").eval()
    on_float = PeftModel.from_pretrained(load_model(base, device="cpu").model, tmp_path / "adapter").eval()
    want = logits(on_nf4, ids)
    torch.testing.assert_close(logits(merged, ids), want, rtol=0, atol=1e-4)
    assert (logits(on_float, ids) - want).abs().max() > 1e-3, "nf4 changed nothing: the check would prove nothing"


def test_int8_trains_and_merges_into_float_weights(monkeypatch, capsys, base, tmp_path):
    finetune(monkeypatch, capsys, base, tmp_path / "merged", "lora.quantize=int8", "--merge")
    merged = load_model(tmp_path / "merged", device="cpu").model
    original = load_model(base, device="cpu").model
    assert not quantize.is_quantized(merged)
    weight, before = merged.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)


def test_dpo_trains_an_adapter_on_an_nf4_base(monkeypatch, capsys, base, tmp_path):
    """The DPO reference (the adapter disabled) is the nf4 base itself: nothing else to load."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Say a word {i}", "chosen": "yes indeed", "rejected": "no way"} for i in range(12)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    args = ["dpo", "--model", str(base), "--data", str(pairs), "--out", str(out), "--steps", "3", "eval.probe=false"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "lora.quantize=nf4", "train.lr=1e-2")
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["config"]["lora"]["quantize"] == "nf4"
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items()), "nothing trained"


def _one_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_without_bitsandbytes_is_one_line_and_nothing_written(monkeypatch, capsys, tiny_llama, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if not installed
    quantize.check_backend.cache_clear()
    try:
        args = ["finetune", "--model", str(tiny_llama), "--task", "dates", "--out", str(tmp_path / "run"), *QUICK]
        code, _, err = run_cli(monkeypatch, capsys, *args, "lora.quantize=nf4")
    finally:
        quantize.check_backend.cache_clear()
    assert "lora.quantize: nf4 needs bitsandbytes, which is not installed: pip install" in _one_line(code, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--method", "full", "--task", "dates"], "needs method: lora"),
        (["distill", "--student-layers", "1", "--task", "dates", "method=lora"], "a distilled student trains"),
        (["finetune", "--task", "dates", "lora.quantize=nf3"], "lora.quantize"),
    ],
)
def test_quantize_where_it_has_no_meaning_is_refused(monkeypatch, capsys, tiny_llama, tmp_path, args, message):
    model = ["--teacher" if args[0] == "distill" else "--model", str(tiny_llama)]
    extra = [] if "lora.quantize=nf3" in args else ["lora.quantize=nf4"]
    code, _, err = run_cli(monkeypatch, capsys, *args, *model, "--out", str(tmp_path / "run"), *extra)
    assert message in _one_line(code, err)
    assert list(tmp_path.iterdir()) == []
