"""mergekit YAML, read unchanged and checked strictly.

The schema is mergekit's `MergeConfiguration` [mk config.py]: `models` or `slices` (each slice's `sources`
carry a `layer_range`), `base_model`, `merge_method`, `parameters` at top level / per model / per slice,
`dtype`, `out_dtype`, `tokenizer_source` (or `tokenizer: {source}`), `chat_template`. A parameter setting
is a scalar, a gradient (list of numbers interpolated over layers) or a list of `{filter, value}` entries
(first whose filter is a substring of the tensor name wins). Where mergekit silently ignores a mistake,
this module stops with one line naming the key and the accepted names: unknown keys, unknown methods,
misspelled parameters (a parameter another method knows is only warned about, so mergekit's own configs
still run), values of the wrong type. A mergekit parameter that only tunes mergekit's memory (int8_mask)
is accepted with a one-line note. `resolve_setting` is mergekit's `evaluate_setting` semantics.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import config as config_io
from lmforge.errors import UserError
from lmforge.merge.methods import ALL_PARAMETER_NAMES, METHODS, Param

log = logging.getLogger("lmforge.merge")

# lmforge methods that are not tensor functions: they rewrite into one (expand.py, soup.py, search.py).
EXTRA_METHODS: dict[str, tuple[Param, ...]] = {
    "greedy_soup": (Param("task", str), Param("limit", int, default=50), Param("metric", str, default="")),
    "block_expansion": (Param("num_new", int, default=1),),
    "weight_search": (
        Param("task", str),
        Param("weights", float, default=None),
        Param("limit", int, default=50),
        Param("metric", str, default=""),
        Param("rule", str, default="min"),
    ),
}
# mergekit parameters lmforge accepts (its configs carry them) but has no use for, and why the result is the same.
NO_EFFECT_PARAMETERS = {
    "int8_mask": "it only saves memory in mergekit (its 0/1 sign-agreement masks stored as int8 instead of "
    "floats); the merged values are the same either way",
}
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
TOP_KEYS = (
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)


@dataclass(frozen=True)
class Source:
    """One input model of a slice (or of the whole merge): its layers [a, b) and its own parameters."""

    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Slice:
    sources: tuple[Source, ...]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeConfig:
    """A parsed, checked mergekit configuration; `raw` is what the user wrote (for lmforge.yaml)."""

    merge_method: str
    models: tuple[Source, ...] | None
    slices: tuple[Slice, ...] | None
    base_model: str | None
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    chat_template: str | None
    raw: dict[str, Any]
    where: str = "config"

    def referenced(self) -> list[str]:
        """Every model named, in order of first mention (base model first when given)."""
        names = [self.base_model] if self.base_model else []
        for source in self.models or ():
            names.append(source.model)
        for piece in self.slices or ():
            names += [piece.base_model] if piece.base_model else []
            names += [s.model for s in piece.sources]
        return list(dict.fromkeys(names))


def method_params(method: str) -> tuple[Param, ...]:
    return EXTRA_METHODS[method] if method in EXTRA_METHODS else METHODS[method].params


def read(config: str | Path | dict) -> MergeConfig:
    """A mergekit YAML path or its parsed dict -> MergeConfig; every mistake is a one-line UserError."""
    if isinstance(config, dict):
        data, where = config, "config"
    else:
        data, where = config_io.read_yaml(Path(config)), str(config)
    if not isinstance(data, dict):
        raise UserError(f"{where}: the top level must be a mapping (merge_method:, models: ...)")
    _check_keys(data, TOP_KEYS, "", where)
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise UserError(f"{where}: missing merge_method: use one of {', '.join(accepted_methods())}")
    if method not in METHODS and method not in EXTRA_METHODS:
        raise UserError(f"{where}: {_unknown_method(config_io.printable(method))}")
    if "modules" in data:
        raise UserError(f"{where}: 'modules:' (multi-module models) is not supported: use models or slices")
    if ("models" in data) == ("slices" in data):
        raise UserError(f"{where}: give exactly one of 'models' or 'slices'")
    params = method_params(method)
    tokenizer_source = data.get("tokenizer_source")
    if "tokenizer" in data:
        tokenizer = data["tokenizer"]
        if not isinstance(tokenizer, dict) or set(tokenizer) - {"source"} or tokenizer_source is not None:
            raise UserError(
                f"{where}: only 'tokenizer: {{source: base|union|MODEL}}' is supported (no tokens or padding), "
                "and not together with tokenizer_source"
            )
        tokenizer_source = tokenizer.get("source", "union")
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and str(data[key]).removeprefix("torch.") not in DTYPE_NAMES:
            raise UserError(f"{where}: {key} {data[key]!r} is not one of {', '.join(DTYPE_NAMES)}")
    models = slices = None
    if "models" in data:
        models = tuple(
            _source(item, f"models[{i}]", params, where, False) for i, item in enumerate(_list(data, "models", where))
        )
    else:
        slices = tuple(
            _slice(item, f"slices[{i}]", params, where) for i, item in enumerate(_list(data, "slices", where))
        )
    return MergeConfig(
        merge_method=method,
        models=models,
        slices=slices,
        base_model=_model(data.get("base_model"), "base_model", where) if data.get("base_model") is not None else None,
        parameters=_parameters(data.get("parameters"), "parameters", params, where),
        dtype=str(data["dtype"]).removeprefix("torch.") if data.get("dtype") else None,
        out_dtype=str(data["out_dtype"]).removeprefix("torch.") if data.get("out_dtype") else None,
        tokenizer_source=_model(tokenizer_source, "tokenizer_source", where) if tokenizer_source else None,
        chat_template=_string(data.get("chat_template"), "chat_template", where),
        raw=data,
        where=where,
    )


def accepted_methods() -> list[str]:
    return sorted(METHODS) + sorted(EXTRA_METHODS)


def _unknown_method(method: str) -> str:
    close = difflib.get_close_matches(method, accepted_methods(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown merge_method '{method}': {hint}accepted: {', '.join(accepted_methods())}"


def _check_keys(data: dict, allowed: tuple[str, ...], prefix: str, where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"accepted keys: {', '.join(allowed)}"
            raise UserError(f"{where}: unknown key '{prefix}{config_io.printable(str(key))}': {hint}")


def _list(data: dict, key: str, where: str) -> list:
    value = data[key]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{key}' must be a non-empty list")
    return value


def _model(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(
            f"{where}: {key} must be a model reference (a folder, 'default', or MODEL+ADAPTER), got {value!r}"
        )
    return value.strip()


def _string(value: Any, key: str, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _source(item: Any, key: str, params: tuple[Param, ...], where: str, sliced: bool) -> Source:
    if isinstance(item, str) and not sliced:
        return Source(_model(item, key, where))  # `models: [a, b]` shorthand
    if not isinstance(item, dict):
        raise UserError(f"{where}: {key} must be a mapping with 'model:'")
    _check_keys(item, ("model", "layer_range", "parameters") if sliced else ("model", "parameters"), f"{key}.", where)
    if "model" not in item:
        raise UserError(f"{where}: {key} has no 'model:'")
    layer_range = None
    if sliced:
        value = item.get("layer_range")
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
            raise UserError(f"{where}: {key}.layer_range must be [first, end] (two integers), got {value!r}")
        if not 0 <= value[0] < value[1]:
            raise UserError(f"{where}: {key}.layer_range {value} must satisfy 0 <= first < end")
        layer_range = (value[0], value[1])
    return Source(
        _model(item["model"], f"{key}.model", where),
        layer_range,
        _parameters(item.get("parameters"), f"{key}.parameters", params, where),
    )


def _slice(item: Any, key: str, params: tuple[Param, ...], where: str) -> Slice:
    if not isinstance(item, dict):
        raise UserError(f"{where}: {key} must be a mapping with 'sources:'")
    _check_keys(item, ("sources", "base_model", "parameters", "residual_weight"), f"{key}.", where)
    if item.get("residual_weight") is not None:
        raise UserError(f"{where}: {key}.residual_weight does nothing in mergekit either: remove it")
    sources = item.get("sources")
    if not isinstance(sources, list) or not sources:
        raise UserError(f"{where}: {key}.sources must be a non-empty list")
    parsed = tuple(_source(s, f"{key}.sources[{i}]", params, where, True) for i, s in enumerate(sources))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in parsed}
    if len(lengths) > 1:
        raise UserError(f"{where}: the sources of {key} have different layer counts {sorted(lengths)}: make them equal")
    base = _model(item["base_model"], f"{key}.base_model", where) if item.get("base_model") else None
    return Slice(parsed, base, _parameters(item.get("parameters"), f"{key}.parameters", params, where))


def _parameters(value: Any, key: str, params: tuple[Param, ...], where: str) -> dict[str, Any]:
    """Check every parameter name and every scalar inside its setting against the method's spec."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a mapping of name: value")
    by_name = {p.name: p for p in params}
    checked = {}
    for name, setting in value.items():
        shown = config_io.printable(str(name))
        if name not in by_name:
            if name in ALL_PARAMETER_NAMES:
                log.warning("%s: %s.%s is not a parameter of this merge method: ignored", where, key, shown)
                continue
            accepted = ", ".join(by_name) or "none"
            close = difflib.get_close_matches(str(name), list(by_name), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"{where}: unknown parameter '{key}.{shown}': {hint}this method accepts: {accepted}")
        _check_setting(setting, by_name[name], f"{key}.{shown}", where)
        if name in NO_EFFECT_PARAMETERS and setting:
            log.warning("%s: %s.%s has no effect: %s", where, key, name, NO_EFFECT_PARAMETERS[name])
        checked[name] = setting
    return checked


def _check_setting(setting: Any, param: Param, key: str, where: str) -> None:
    """A scalar, a gradient list, a {filter, value} mapping, or a list of those mappings."""
    if isinstance(setting, dict) or (isinstance(setting, list) and setting and isinstance(setting[0], dict)):
        for i, cond in enumerate(setting if isinstance(setting, list) else [setting]):
            if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise UserError(f"{where}: {key}[{i}] must be {{filter: NAME_PART, value: V}} (filter optional)")
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                raise UserError(f"{where}: {key}[{i}].filter must be a string (part of a tensor name)")
            _check_setting(cond["value"], param, f"{key}[{i}].value", where)
        return
    for i, scalar in enumerate(setting if isinstance(setting, list) else [setting]):
        try:
            coerce(scalar, param)
        except ValueError as err:
            label = f"{key}[{i}]" if isinstance(setting, list) else key
            raise UserError(f"{where}: {label}: {err}") from None


def coerce(value: Any, param: Param) -> Any:
    """A scalar converted to the parameter's type, as pydantic's lax mode does in mergekit."""
    if value is None and param.default is None:
        return None
    if param.type is bool:
        if isinstance(value, bool):
            return value
        if value in (0, 1) and not isinstance(value, float):
            return bool(value)
    elif param.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif param.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif param.type is str and isinstance(value, str):
        return value
    raise ValueError(f"must be {param.type.__name__}, got {value!r}")


def resolve_setting(setting: Any, param: Param, tensor_name: str, t: float) -> Any:
    """mergekit's evaluate_setting: filters pick the first matching entry, numeric lists interpolate at t."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return coerce(setting, param)
    if not setting:
        return None
    if isinstance(setting[0], dict):
        for cond in setting:
            pattern = cond.get("filter")
            if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
                return resolve_setting(cond["value"], param, tensor_name, t)
        return None
    values = [coerce(v, param) for v in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    return coerce((1 - (scaled - low)) * values[low] + (scaled - low) * values[high], param)
