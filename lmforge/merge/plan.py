"""The output plan: every output tensor, which input tensors feed it, and its resolved parameters.

Follows mergekit's planner [mk plan.py]: `models:` becomes one slice over every layer (the base model is
appended as a source when it is not listed); each slice contributes its layers in order, the gradient
position t of layer j of an n-layer slice is j / (n - 1) (1 for a one-layer slice), and the tensors outside
the layers take t = 0 (the first value of a gradient), the embeddings from the first slice and the final
norm / lm_head from the last. Parameters resolve per tensor from the most specific setting down: the
source's own, the slice's, the top level; per-input parameters see the input tensor's name, shared ones
the output's. A missing `lm_head.weight` reads the tied `model.embed_tokens.weight`, and is left out when
no input has one. Layers are found by name (`<prefix>.layers.N.<rest>`), so any decoder checkpoint works
without an architecture table. Everything is checked here, before any tensor is read or written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.merge import config as merge_config
from lmforge.merge.methods import METHODS, REQUIRED, Method, Param
from lmforge.merge.safetensors_io import TensorInfo, index_folder

_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks))\.(\d+)\.(.+)$")
TIED = {"lm_head.weight": "model.embed_tokens.weight"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class InputModel:
    """One referenced model: what the user wrote, where it lives, its tensors and config.json."""

    ref: str
    folder: Path
    index: dict[str, TensorInfo]
    config: dict

    @property
    def layers(self) -> int:
        count = self.config.get("num_hidden_layers")
        if isinstance(count, int):
            return count
        found = [int(m.group(2)) for name in self.index if (m := _LAYER.match(name))]
        return max(found) + 1 if found else 0


def open_model(ref: str, folder: Path) -> InputModel:
    """Index a model folder. A tied checkpoint that stores its embedding only as `lm_head.weight` (as
    safetensors' save_model keeps it) is read as `model.embed_tokens.weight`, the name save_pretrained keeps."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json: pass a model folder written by save_pretrained")
    config, index = json.loads(config_file.read_text()), index_folder(folder)
    embed, head = TIED["lm_head.weight"], "lm_head.weight"
    if config.get("tie_word_embeddings") and head in index and embed not in index:
        index = {(embed if name == head else name): info for name, info in index.items()}
    return InputModel(ref, folder, index, config)


@dataclass
class TensorPlan:
    """One output tensor: its inputs (model number, tensor name), the base among them, and parameters."""

    name: str
    inputs: list[tuple[int, str]]
    base: int | None
    shared: dict
    per_input: list[dict]
    shape: tuple[int, ...]
    dtype: torch.dtype
    """Output storage dtype."""
    floating: bool = True
    vocab: bool = False
    """A vocabulary-indexed tensor (embeddings, lm_head) that the tokenizer may re-map."""
    t: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    tensors: list[TensorPlan]
    layers: int
    """Output layer count (config.json num_hidden_layers)."""
    donor: int
    """The model whose config and tokenizer the output starts from: the base model, else the first."""


def build(cfg: merge_config.MergeConfig, models: list[InputModel]) -> Plan:
    """Plan every output tensor of `cfg` over the opened `models` (numbered as cfg.referenced())."""
    number = {m.ref: i for i, m in enumerate(models)}
    method = METHODS[cfg.merge_method]
    _check_architectures(models)
    slices = _as_slices(cfg, models)
    donor = number[cfg.base_model] if cfg.base_model else number[slices[0].sources[0].model]
    for s_index, piece in enumerate(slices):
        for source in piece.sources:
            model = models[number[source.model]]
            if source.layer_range[1] > model.layers:
                raise UserError(
                    f"{cfg.where}: slices[{s_index}] layer_range {list(source.layer_range)} is out of bounds: "
                    f"{source.model} has {model.layers} layers"
                )
        _check_contract(cfg, method, piece, s_index)
    plans: list[TensorPlan] = []
    first, last = slices[0], slices[-1]
    outer = _outer_names(models[number[first.sources[0].model]], [models[number[s.model]] for s in first.sources])
    pre = [n for n in outer if not _is_post(n)]
    post = [n for n in outer if _is_post(n)]
    for name in pre:
        plans += _plan_tensor(cfg, method, models, number, first, [(s, name) for s in first.sources], name, 0.0)
    out_layer = 0
    for piece in slices:
        length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
        for j in range(length):
            t = j / (length - 1) if length > 1 else 1.0
            lead = piece.sources[0]
            prefix_suffixes = _layer_tensors(models[number[lead.model]], lead.layer_range[0] + j)
            for prefix, suffix in prefix_suffixes:
                inputs = [(s, f"{prefix}.{s.layer_range[0] + j}.{suffix}") for s in piece.sources]
                plans += _plan_tensor(cfg, method, models, number, piece, inputs, f"{prefix}.{out_layer}.{suffix}", t)
            out_layer += 1
    for name in post:
        plans += _plan_tensor(cfg, method, models, number, last, [(s, name) for s in last.sources], name, 0.0)
    return Plan(plans, out_layer, donor)


def _check_architectures(models: list[InputModel]) -> None:
    first = models[0]
    for other in models[1:]:
        for key in ("model_type", "architectures"):
            mine, theirs = first.config.get(key), other.config.get(key)
            if mine is not None and theirs is not None and mine != theirs:  # GGUF conversions lack architectures
                raise UserError(
                    f"different architectures: {first.ref} is {first.config.get(key)} but {other.ref} is "
                    f"{other.config.get(key)} ({key} in config.json): merge models of one architecture"
                )


def _as_slices(cfg: merge_config.MergeConfig, models: list[InputModel]) -> list[merge_config.Slice]:
    """`models:` -> one slice over all layers, with the base appended when it is not among the models."""
    if cfg.slices:
        return list(cfg.slices)
    layers = {m.ref: m.layers for m in models}
    sources = [merge_config.Source(s.model, (0, layers[s.model]), s.parameters) for s in cfg.models]
    if cfg.base_model and cfg.base_model not in {s.model for s in sources}:
        sources.append(merge_config.Source(cfg.base_model, (0, layers[cfg.base_model])))
    counts = {layers[s.model] for s in sources}
    if len(counts) > 1:
        raise UserError(
            f"{cfg.where}: the models have different layer counts {sorted(counts)}: use slices to pick layers"
        )
    return [merge_config.Slice(tuple(sources))]


def _check_contract(cfg: merge_config.MergeConfig, method: Method, piece: merge_config.Slice, index: int) -> None:
    """mergekit's InputContract: base required/optional/ignored and input counts, per slice."""
    names = [s.model for s in piece.sources]
    where = f"{cfg.where}: {cfg.merge_method}" + (f" (slices[{index}])" if cfg.slices else "")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: a model appears twice among the inputs: list each model once")
    base = (piece.base_model or cfg.base_model) if method.base != "ignored" else None
    if base is not None and base not in names:
        raise UserError(f"{where}: the base model {base} is not among the slice's sources: add it")
    if method.base == "required" and base is None:
        raise UserError(f"{where} needs a base_model: set base_model to the model the others were fine-tuned from")
    non_base = len(names) - (base is not None)
    for what, count, low, high in (
        ("inputs", len(names), method.min_inputs, method.max_inputs),
        ("non-base models", non_base, method.min_non_base, method.max_non_base),
    ):
        if count < low or (high is not None and count > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if count < low else f"at most {high}"
            raise UserError(f"{where} takes {want} {what}, got {count}")


def _outer_names(lead: InputModel, sources: list[InputModel]) -> list[str]:
    """Tensors outside the layers, in the lead model's order; lm_head only if some source stores one."""
    names = [n for n in lead.index if not _LAYER.match(n)]
    for model in sources:
        names += [n for n in model.index if not _LAYER.match(n) and n not in names and n in TIED]
    return names


def _is_post(name: str) -> bool:
    return name.startswith("lm_head") or ("norm" in name and not _LAYER.match(name))


def _layer_tensors(model: InputModel, layer: int) -> list[tuple[str, str]]:
    found = []
    for name in model.index:
        match = _LAYER.match(name)
        if match and int(match.group(2)) == layer:
            found.append((match.group(1), match.group(3)))
    return found


def _plan_tensor(cfg, method: Method, models, number, piece, inputs, out_name: str, t: float) -> list[TensorPlan]:
    """Resolve one output tensor: input names (tied fallback), shapes, dtype, parameters."""
    base_ref = (piece.base_model or cfg.base_model) if method.base != "ignored" else None
    resolved, infos = [], []
    for source, name in inputs:
        model = models[number[source.model]]
        if name not in model.index and name in TIED and TIED[name] in model.index:
            name = TIED[name]
        if name not in model.index:
            raise UserError(
                f"missing tensor {name} in {model.ref} ({model.folder}): the models must share an architecture"
            )
        resolved.append((number[source.model], name))
        infos.append(model.index[name])
    vocab = _is_vocab(out_name, infos[0], models[resolved[0][0]])
    shapes = {info.shape for info in infos}
    if len(shapes) > 1 and not (vocab and cfg.tokenizer_source and len({s[1:] for s in shapes}) == 1):
        listing = ", ".join(f"{models[i].ref} {list(info.shape)}" for (i, _), info in zip(resolved, infos, strict=True))
        raise UserError(f"shape mismatch for {out_name}: {listing}: merge models of the same size (or use slices)")
    floating = all(info.dtype.is_floating_point for info in infos)
    storage = infos[0].dtype
    for info in infos[1:]:
        storage = torch.promote_types(storage, info.dtype)
    dtype = _DTYPES[cfg.out_dtype or cfg.dtype] if floating and (cfg.out_dtype or cfg.dtype) else storage
    base = next((i for i, (source, _) in enumerate(inputs) if source.model == base_ref), None) if base_ref else None
    shared, per_input = _resolve_parameters(cfg, method.params, piece, inputs, resolved, out_name, base, t, models)
    return [TensorPlan(out_name, resolved, base, shared, per_input, infos[0].shape, dtype, floating, vocab, t)]


def _is_vocab(name: str, info: TensorInfo, model: InputModel) -> bool:
    return not _LAYER.match(name) and len(info.shape) == 2 and info.shape[0] == model.config.get("vocab_size")


def _resolve_parameters(cfg, params: tuple[Param, ...], piece, inputs, resolved, out_name, base, t, models):
    """mergekit's precedence: source parameters > slice parameters > top-level parameters > default."""
    shared = {
        p.name: _resolve(p, [piece.parameters, cfg.parameters], out_name, t, cfg, out_name)
        for p in params
        if p.scope == "shared"
    }
    per_input = []
    for i, ((source, _), (_, in_name)) in enumerate(zip(inputs, resolved, strict=True)):
        own = [s.parameters for s in piece.sources if s.model == source.model]
        chain = own + [piece.parameters, cfg.parameters]
        wanted = [p for p in params if p.scope == "input" or (p.scope == "non_base" and i != base)]
        where = f"{out_name} of {source.model}"
        per_input.append({p.name: _resolve(p, chain, in_name, t, cfg, where) for p in wanted})
        for name in ("density",):
            value = per_input[-1].get(name)
            if value is not None and not 0 < value <= 1:
                raise UserError(
                    f"{cfg.where}: density {value} for {where} is outside (0, 1]: use a share of weights kept"
                )
        if "epsilon" in per_input[-1] and per_input[-1]["density"] < 1:
            d, e = per_input[-1]["density"], per_input[-1]["epsilon"]
            if not (d - e > 0 and d + e < 1):
                raise UserError(
                    f"{cfg.where}: epsilon {e} with density {d} for {where}: density +/- epsilon must stay in (0, 1)"
                )
    if shared.get("rescale_mode") not in (None, "l1", "density"):
        raise UserError(f"{cfg.where}: rescale_mode must be l1 (mergekit) or density (the papers' 1/p)")
    return shared, per_input


def _resolve(param: Param, chain: list[dict], tensor_name: str, t: float, cfg, where: str):
    for scope in chain:
        if param.name in scope:
            value = merge_config.resolve_setting(scope[param.name], param, tensor_name, t)
            if value is not None:
                return value
    if param.default is REQUIRED:
        raise UserError(
            f"{cfg.where}: missing parameter '{param.name}' for {where}: set it in that model's parameters "
            "or in the top-level parameters"
        )
    return param.default


def explain(plan: Plan, models: list[InputModel], method: str) -> list[list[str]]:
    """Rows (tensor, t, inputs, shared parameters, per-input parameters) for `--explain`."""
    rows = []
    for p in plan.tensors:
        names = [Path(models[i].ref).name + ("*" if k == p.base else "") for k, (i, _) in enumerate(p.inputs)]
        shared = " ".join(f"{k}={_short(v)}" for k, v in p.shared.items())
        per = "; ".join(
            f"{n}: " + " ".join(f"{k}={_short(v)}" for k, v in d.items())
            for n, d in zip(names, p.per_input, strict=True)
            if d
        )
        rows.append([p.name, f"{p.t:.3f}", ", ".join(names), shared, per])
    return rows


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
