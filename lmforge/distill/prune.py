"""Width pruning of a llama student (Minitron: Muralidharan et al. 2024, arXiv:2407.14679, section 2.2).

`importance` scores every attention head, MLP channel and hidden channel from forward activations on a few
calibration batches (no gradients): per row, the mean over its real tokens of the head's output norm at
`o_proj`'s input, of |down_proj's input| per channel, and of |RMSNorm output| per hidden channel (summed over
every norm); then the L2 norm over rows, the paper's best aggregation (batch L2, sequence mean). Magnitudes
rather than signed values, so a sequence mean cannot cancel a busy channel to zero.
`choose` keeps the top units (query heads evenly per key-value group, never part of a head) and `prune`
slices the weights into a new, smaller model of the same class. Hidden channels are cut out of every
projection, norm and the (tied or untied) embeddings; RMSNorm then averages over fewer channels, so its weights
are scaled by sqrt(d / d') and its eps by d / d': the pruned model computes exactly what the original computes
with those channels zeroed (see tests/test_distill_prune.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.train.chunked import model_inputs

SUPPORTED = ("llama",)  # the layout sliced below; tested on LlamaForCausalLM only


@dataclass(frozen=True)
class WidthSettings:
    """A narrower student: give its shape, or the share of the teacher's parameters it keeps (null: no width
    pruning). Units are picked by activation importance on the calibration batch."""

    hidden_size: int | None = None
    """Hidden channels kept (embeddings, every projection and norm); null: all."""
    intermediate_size: int | None = None
    """MLP channels kept per layer; null: all."""
    num_attention_heads: int | None = None
    """Query heads kept per layer: a multiple of the teacher's key-value heads (the same number kept in each
    group); null: all."""
    params_fraction: float | None = None
    """Instead of a shape: the student's parameters as a fraction of the teacher's, in (0, 1). Rule: the MLP
    narrows first, down to half its width; then the hidden size; heads stay (see docs)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
            config_io.at_least(self, name, 1)
        fraction = self.params_fraction
        config_io.require(
            fraction is None or 0 < fraction < 1, "params_fraction", f"must be in (0, 1), got {fraction!r}"
        )
        shape = (self.hidden_size, self.intermediate_size, self.num_attention_heads)
        config_io.require(
            fraction is None or shape == (None, None, None),
            "params_fraction",
            "cannot go with hidden_size/intermediate_size/num_attention_heads: give a shape or a fraction",
        )

    @property
    def enabled(self) -> bool:
        return any(v is not None for v in (self.hidden_size, self.intermediate_size, self.num_attention_heads)) or (
            self.params_fraction is not None
        )


@dataclass(frozen=True)
class Shape:
    """A width: hidden channels, MLP channels per layer, query heads per layer."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_model(model) -> None:
    """Width pruning slices the llama layout; anything else gets one clear line."""
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"width pruning supports llama models, got model_type {kind!r}: leave width unset")


def param_count(config, layers: int | None = None) -> int:
    """Parameters of a llama model of `config` (with `layers` decoder blocks if given), without building it."""
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    kv, hd, vocab = config.num_key_value_heads, _head_dim(config), config.vocab_size
    attention = 2 * h * heads * hd + 2 * h * kv * hd
    if getattr(config, "attention_bias", False):
        attention += heads * hd + 2 * kv * hd + h
    mlp = 3 * h * inter + ((2 * inter + h) if getattr(config, "mlp_bias", False) else 0)
    blocks = config.num_hidden_layers if layers is None else layers
    embeddings = vocab * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + blocks * (attention + mlp + 2 * h) + h


def target_shape(config, layers: int, width: WidthSettings, teacher_params: int) -> Shape:
    """The student's width: the given shape checked against `config`, or one that meets params_fraction.

    Fraction rule (largest widths whose count is <= fraction x teacher_params, with `layers` blocks): narrow
    the MLP alone, down to half its width; if that is not enough, narrow the hidden size until the MLP at half
    fits, then widen the MLP again as far as the target allows. Widths move in steps of 8 when the teacher's
    are multiples of 8, and the hidden size stays a multiple of the head count (transformers' llama config
    refuses other sizes when the model is saved). Heads are kept.
    """
    h, inter, heads, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
    )
    if width.params_fraction is None:
        shape = Shape(width.hidden_size or h, width.intermediate_size or inter, width.num_attention_heads or heads)
        for name, got, most in (
            ("hidden_size", shape.hidden_size, h),
            ("intermediate_size", shape.intermediate_size, inter),
            ("num_attention_heads", shape.num_attention_heads, heads),
        ):
            if got > most:
                raise UserError(f"width.{name}={got} is more than the teacher's {most}: choose at most {most}")
        if shape.num_attention_heads % kv:
            raise UserError(
                f"width.num_attention_heads={shape.num_attention_heads} breaks head grouping: the teacher has {kv} "
                f"key-value heads, so keep a multiple of {kv} ({', '.join(map(str, range(kv, heads + 1, kv)))})"
            )
        if shape.hidden_size % shape.num_attention_heads:
            fits = [n for n in range(shape.num_attention_heads, h + 1, shape.num_attention_heads)][-3:]
            raise UserError(
                f"width.hidden_size={shape.hidden_size} is not a multiple of the student's "
                f"{shape.num_attention_heads} attention heads, which a llama config requires: choose a multiple "
                f"(such as {', '.join(map(str, fits))})"
            )
        return shape
    target = width.params_fraction * teacher_params

    def count(hidden: int, intermediate: int) -> int:
        trial = copy.copy(config)
        trial.hidden_size, trial.intermediate_size, trial.head_dim = hidden, intermediate, _head_dim(config)
        return param_count(trial, layers)

    step = 8 if h % 8 == 0 and inter % 8 == 0 else 1
    full = count(h, inter)
    if full <= target:
        raise UserError(
            f"width.params_fraction={width.params_fraction}: the student's {layers} layers at full width already "
            f"hold {full / teacher_params:.3f} of the teacher's parameters: raise it or keep more student_layers"
        )
    half = max(step, math.ceil(inter / 2 / step) * step)
    for intermediate in range(inter - step, half - 1, -step):
        if count(h, intermediate) <= target:
            return Shape(h, intermediate, heads)
    hidden_step = math.lcm(step, heads)
    for hidden in range(h - hidden_step, 0, -hidden_step):
        if count(hidden, half) <= target:
            intermediate = next(i for i in range(inter, half - 1, -step) if count(hidden, i) <= target)
            return Shape(hidden, intermediate, heads)
    raise UserError(
        f"width.params_fraction={width.params_fraction} is below what {layers} layers can reach by width: "
        "raise it or set fewer student_layers"
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq, n) -> (batch, n): the mean over each row's real tokens."""
    weights = mask.to(values.dtype)[:, :, None]
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1)


@torch.no_grad()
def importance(model, batches) -> dict[str, torch.Tensor]:
    """Activation importance of every prunable unit, from forward passes over `batches`.

    Args:
        model: a llama causal LM.
        batches: dicts with input_ids (batch, seq) and optionally attention_mask / position_ids.
    Returns:
        {"hidden": (hidden,), "layers.{i}.heads": (query heads,), "layers.{i}.mlp": (intermediate,)}, float32
        on the CPU: per row the sequence mean of the activation magnitude, then the L2 norm over all rows.
    """
    check_model(model)
    decoder = model.get_decoder()
    layers = decoder.layers
    squares: dict[str, torch.Tensor] = {}  # sums over rows of the squared per-row means
    row_hidden: list[torch.Tensor] = []  # this batch's per-row hidden-channel sum over norms
    state: dict = {}
    head_dim = _head_dim(model.config)

    def add(key: str, per_row: torch.Tensor) -> None:
        value = per_row.float().pow(2).sum(0).cpu()
        squares[key] = squares[key] + value if key in squares else value

    def on_heads(key):
        def hook(module, args):
            x = args[0]  # (batch, seq, heads * head_dim)
            norms = x.float().unflatten(-1, (-1, head_dim)).norm(dim=-1)  # (batch, seq, heads)
            add(key, _masked_mean(norms, state["mask"]))

        return hook

    def on_mlp(key):
        def hook(module, args):
            add(key, _masked_mean(args[0].float().abs(), state["mask"]))  # (batch, intermediate)

        return hook

    def on_norm(module, args, output):
        row_hidden.append(_masked_mean(output.float().abs(), state["mask"]))  # (batch, hidden)

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(f"layers.{i}.heads")))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp(f"layers.{i}.mlp")))
        handles.append(layer.input_layernorm.register_forward_hook(on_norm))
        handles.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    handles.append(decoder.norm.register_forward_hook(on_norm))
    try:
        for batch in batches:
            ids = batch["input_ids"].to(model.device)
            mask = batch.get("attention_mask")
            state["mask"] = (torch.ones_like(ids) if mask is None else mask.to(model.device)).bool()
            row_hidden.clear()
            # the training forward's arguments: packed rows (position_ids) attend within their own examples
            inputs = model_inputs(batch)
            decoder(**{key: v.to(model.device) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()})
            add("hidden", torch.stack(row_hidden).sum(0))
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.sqrt() for key, value in squares.items()}


def choose(scores: dict[str, torch.Tensor], config, shape: Shape) -> dict[str, torch.Tensor]:
    """The sorted indices each unit kind keeps: the top-scoring ones, query heads top-k within each kv group."""
    groups = config.num_key_value_heads
    per_group = shape.num_attention_heads // groups
    keep = {"hidden": scores["hidden"].topk(shape.hidden_size).indices.sort().values}
    for key, score in scores.items():
        if key.endswith(".mlp"):
            keep[key] = score.topk(shape.intermediate_size).indices.sort().values
        elif key.endswith(".heads"):
            grouped = score.view(groups, -1)  # (kv heads, query heads per group): heads are grouped in order
            top = grouped.topk(per_group, dim=1).indices.sort(dim=1).values
            keep[key] = (top + torch.arange(groups)[:, None] * grouped.shape[1]).flatten()
    return keep


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of the kept heads in a (heads * head_dim, ...) projection."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def prune(model, keep: dict[str, torch.Tensor]):
    """A new model of the same class holding only the kept units (see `choose`; a missing key keeps all).

    Every layer must keep the same number of heads and MLP channels (the config has one width), and each
    key-value group the same number of query heads.
    """
    check_model(model)
    config = model.config
    total_layers, head_dim = config.num_hidden_layers, _head_dim(config)
    hidden = keep.get("hidden", torch.arange(config.hidden_size)).cpu()
    heads = [keep.get(f"layers.{i}.heads", torch.arange(config.num_attention_heads)).cpu() for i in range(total_layers)]
    mlp = [keep.get(f"layers.{i}.mlp", torch.arange(config.intermediate_size)).cpu() for i in range(total_layers)]
    if len({len(h) for h in heads}) != 1 or len({len(m) for m in mlp}) != 1:
        raise UserError("width pruning keeps the same number of heads and MLP channels in every layer")
    per_group = config.num_attention_heads // config.num_key_value_heads
    for i, kept in enumerate(heads):
        counts = torch.bincount(kept // per_group, minlength=config.num_key_value_heads)
        if len(set(counts.tolist())) != 1:
            raise UserError(f"layer {i} keeps {counts.tolist()} query heads per key-value group: keep them evenly")

    new_config = copy.deepcopy(config)
    new_config.hidden_size, new_config.intermediate_size = len(hidden), len(mlp[0])
    new_config.num_attention_heads, new_config.head_dim = len(heads[0]), head_dim
    ratio = config.hidden_size / len(hidden)
    new_config.rms_norm_eps = config.rms_norm_eps * ratio  # with weights x sqrt(ratio): exact, see module doc

    def sliced(name: str, value: torch.Tensor) -> torch.Tensor:
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else None
        rows = _head_rows(heads[layer], head_dim) if layer is not None else None
        if name.endswith("norm.weight"):
            return value[hidden] * math.sqrt(ratio)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return value[:, hidden]
        if name.endswith("self_attn.q_proj.weight"):
            return value[rows][:, hidden]
        if name.endswith("self_attn.q_proj.bias"):
            return value[rows]
        if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return value[:, hidden]
        if name.endswith("self_attn.o_proj.weight"):
            return value[hidden][:, rows]
        if name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            return value[mlp[layer]][:, hidden]
        if name.endswith(("mlp.gate_proj.bias", "mlp.up_proj.bias")):
            return value[mlp[layer]]
        if name.endswith("mlp.down_proj.weight"):
            return value[hidden][:, mlp[layer]]
        if name.endswith(("o_proj.bias", "down_proj.bias")):
            return value[hidden]
        return value

    pruned = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
    wanted = pruned.state_dict()
    state = {}
    for name, value in model.state_dict().items():
        new = sliced(name, value.detach().cpu())
        if name in wanted and new.shape != wanted[name].shape:
            raise UserError(f"width pruning does not know how to slice {name} {tuple(value.shape)}: leave width unset")
        state[name] = new
    pruned.load_state_dict(state, strict=True)
    return pruned.to(model.device).eval()
