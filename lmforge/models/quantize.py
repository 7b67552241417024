"""QLoRA's frozen base: a model loaded through bitsandbytes (nf4 or int8), and back to float for a merge.

`lora.quantize: nf4 | int8` loads the base with transformers' `BitsAndBytesConfig` (Dettmers et al. 2023,
QLoRA, https://arxiv.org/abs/2305.14314: NF4 with double quantisation; LLM.int8 for int8) and PEFT's
`prepare_model_for_kbit_training` readies it (norms and embeddings in float32, inputs requiring grad).
bitsandbytes is an optional extra (`pip install 'lmforge[qlora]'`); whether it can run here (CUDA, or a
release with a CPU backend) is found by running one tiny quantised layer, not by reading versions, and
refused in one line when it cannot. A merge cannot add a float update to 4-bit weights without rounding it
away, so the adapter is moved onto the dequantised base first and merged there, in float.
"""

from __future__ import annotations

import functools
import os

import torch

from lmforge.errors import UserError
from lmforge.models import compat  # noqa: F401  (bitsandbytes imported offline)

QUANTIZE = ("nf4", "int8")


@functools.cache
def check_backend(kind: str, device_type: str) -> None:
    """Refuse `lora.quantize: kind` where bitsandbytes is missing or cannot run one quantised layer on
    `device_type` (cpu | cuda)."""
    if kind not in QUANTIZE:
        raise UserError(f"lora.quantize must be one of {', '.join(QUANTIZE)} or null, got {kind!r}")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(
            f"lora.quantize: {kind} needs bitsandbytes, which is not installed: pip install 'lmforge[qlora]', "
            "or unset lora.quantize"
        ) from None
    try:
        layer = _quantised_linear(kind, 64, 64, torch.nn.Linear(64, 64).weight.detach()).to(device_type)
        with torch.no_grad():
            layer(torch.ones(2, 64, device=device_type))
    except Exception as error:  # bitsandbytes raises anything from RuntimeError to NotImplementedError here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"lora.quantize: {kind}: bitsandbytes {bnb.__version__} cannot run on {device_type} here ({first}): "
            "train on a CUDA GPU, install a bitsandbytes with a CPU backend (0.48 or later), or unset lora.quantize"
        ) from None


def _quantised_linear(kind: str, n_in: int, n_out: int, weight: torch.Tensor) -> torch.nn.Module:
    import bitsandbytes as bnb

    if kind == "nf4":
        layer = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(n_in, n_out, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return layer


def compute_dtype(device_type: str) -> torch.dtype:
    """What the quantised layers compute in: bfloat16 on a GPU that has it (QLoRA's setting), else float32."""
    if device_type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def loading_arguments(kind: str, device: str) -> dict:
    """`from_pretrained` keywords that load the linear layers quantised, straight onto `device` (the output
    head stays float, as transformers keeps it)."""
    from transformers import BitsAndBytesConfig

    check_backend(kind, torch.device(device).type)
    if kind == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(torch.device(device).type),
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    if device == "cuda":  # each process of a multi-GPU launch on its own GPU: a quantised model cannot move later
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return {"quantization_config": config, "device_map": {"": device}}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether any layer of `model` holds bitsandbytes weights."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def keep_one_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights, in place.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight the first time the layer runs in eval
    mode without gradients (lmforge scores the base before training), and from then on the layer computes
    other numbers in training too (0.06-0.12 apart in a tiny model's logits) through a kernel with no backward,
    and dequantises wrongly. Kept off, scoring, training and the merge all see the weights the adapter trains
    against.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def prepare_for_training(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's preparation of a quantised base for LoRA: float32 norms and embeddings, input grads on."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(keep_one_layout(model), use_gradient_checkpointing=False)


def onto_dequantized_base(peft_model):
    """The same LoRA adapter on the base's float weights (the quantised ones, dequantised), ready to merge.

    The adapter's weights are copied out, the LoRA layers removed, the base dequantised in place by
    transformers, and a fresh adapter of the same config attached and loaded with the copied weights.
    """
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = peft_model.peft_config["default"]
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    base = peft_model.unload()
    base.dequantize()
    base = base.float()
    fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, adapter)
    return fresh.eval()
