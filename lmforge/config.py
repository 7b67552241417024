"""One config system: YAML files and `key.sub=value` overrides read into frozen, nested dataclasses.

Each command declares a frozen `@dataclass` (nested: `train`, `lora`, `data`, `eval`) whose fields carry
attribute docstrings; the classes are the only schema and the only docs [lg `args.py`, tt overrides].
`load` reads YAML, applies overrides (later ones win) and builds the dataclass from its type hints.
Unknown keys, type mismatches and missing keys are one-line `UserError`s naming the file or override, the
dotted key and a fix. YAML goes through a `SafeLoader` that also reads `1e-4` as a float (YAML 1.1 wants
`1.0e-4`, so `lr: 1e-4` would silently be a string) and refuses duplicate keys; `dump` writes with the
matching `SafeDumper` so what it writes reads back the same.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lmforge.errors import UserError

T = TypeVar("T")

# The exponent floats YAML 1.1 misses (`1e-4`, `3E5`); with a dot and exponent they already resolve.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load` plus exponent floats, and duplicate keys as errors instead of last-one-wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!set [1]`: let SafeLoader say "expected a mapping node"
            return super().construct_mapping(node, deep=deep)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """`yaml.safe_dump` that quotes strings like '1e3', which `_Loader` would otherwise read back as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


@dataclasses.dataclass(frozen=True)
class _Origin:
    """Which source set each key, so an error names the file or the override at fault."""

    file: str
    overridden: tuple[str, ...] = ()
    passed: tuple[str, ...] = ()
    """Keys given as keyword arguments of a Python entry point."""

    def of(self, key: str) -> str:
        for label, keys in (("keyword argument", self.passed), ("override", self.overridden)):
            for k in keys:
                if key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + "."):
                    return label
        return self.file


class BadValue(ValueError):
    """A field value out of its range, raised by a config dataclass's `__post_init__` (see `require`).

    `field` is the name relative to the class (or a dotted path below it for a check across sections), so
    the reader can report the full dotted key and the file or override it came from.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def require(ok: bool, field: str, problem: str) -> None:
    """Raise `BadValue(field, problem)` unless `ok`: `require(self.r >= 1, "r", f"must be >= 1, got {self.r}")`."""
    if not ok:
        raise BadValue(field, problem)


def at_least(obj: Any, name: str, low: float) -> None:
    """Field `name` of `obj` is None or >= low."""
    value = getattr(obj, name)
    require(value is None or value >= low, name, f"must be >= {low}, got {value!r}")


def above(obj: Any, name: str, low: float) -> None:
    """Field `name` of `obj` is None or > low."""
    value = getattr(obj, name)
    require(value is None or value > low, name, f"must be > {low}, got {value!r}")


def within(obj: Any, name: str, low: float, high: float, high_open: bool = False) -> None:
    """Field `name` of `obj` is None or in [low, high] ([low, high) with `high_open`)."""
    value = getattr(obj, name)
    ok = value is None or (low <= value < high if high_open else low <= value <= high)
    require(ok, name, f"must be in [{low}, {high}{')' if high_open else ']'}, got {value!r}")


def load(path: str | Path | None, cls: type[T], overrides: Sequence[str] = ()) -> T:
    """Read a YAML config file (or none: defaults only), apply `key.sub=value` overrides, build `cls`.

    Args:
        path: YAML file, or None to start from the dataclass defaults.
        cls: the command's frozen config dataclass.
        overrides: CLI strings like "train.lr=3e-4" or "lora.target_modules=[q_proj,v_proj]"; each value is
            parsed as YAML, later ones win over earlier ones and over the file, and setting a section
            (`lora={r: 4}`) replaces it whole.
    Returns:
        An instance of `cls`, with nested dataclasses built from their sections.
    Raises:
        UserError: one line naming the file or "override", the dotted key, and a fix.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key.sub=value' strings, not one str")
    label = "config" if path is None else str(path)
    data = {} if path is None else read_yaml(Path(path))
    _check_top(data, label)
    keys = []
    for text in overrides:
        key, value = parse_override(text)
        _set(data, key.split("."), value)
        keys.append(key)
    return _build(data, cls, "", _Origin(label, tuple(keys)))


def resolve(
    config: str | Path | Mapping[str, Any] | T | None,
    cls: type[T],
    overrides: Sequence[str] = (),
    **settings: Any,
) -> T:
    """What every command's Python entry point takes, read the same way for all of them.

    Args:
        config: a YAML file, a dict of the same keys, a built `cls` instance, or None (defaults only).
        cls: the command's frozen config dataclass.
        overrides: "key.sub=value" strings, as on the command line, applied over `config`.
        settings: keys as keyword arguments, applied last; a dict (or dataclass) value for a section sets
            only the keys it names (`train={"max_steps": 2}` keeps the file's `train.lr`).
    Returns:
        An instance of `cls`; a `cls` instance with nothing to apply comes back as it is.
    Raises:
        UserError: one line naming the file, "override" or "keyword argument", the dotted key, and a fix.
    """
    if isinstance(config, cls) and not overrides and not settings:
        return config
    if config is not None and not isinstance(config, (str, Path, Mapping, cls)):
        raise TypeError(f"config must be a YAML path, a dict or a {cls.__name__}, not {type(config).__name__}")
    data, origin = _gather(config, overrides, settings)
    return _build(data, cls, "", origin)


def as_mapping(
    config: str | Path | Mapping[str, Any] | None, overrides: Sequence[str] = (), **settings: Any
) -> dict[str, Any]:
    """`resolve`'s reading for a command whose schema is not a dataclass (merge reads mergekit YAML): the
    YAML file or dict with `overrides` and keyword `settings` applied, as plain data."""
    return _gather(config, overrides, settings)[0]


def _gather(config: Any, overrides: Sequence[str], settings: Mapping[str, Any]) -> tuple[dict[str, Any], _Origin]:
    """The data of a path, dict, dataclass or None, with overrides then settings applied, and their origins."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key.sub=value' strings, not one str")
    if config is None or isinstance(config, (str, Path)):
        label = "config" if config is None else str(config)
        data = {} if config is None else read_yaml(Path(config))
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        label, data = "config", to_dict(config)
    elif isinstance(config, Mapping):
        label, data = "config", dict(config)
    else:
        raise TypeError(f"config must be a YAML path or a dict, not {type(config).__name__}")
    _check_top(data, label)
    overridden = []
    for text in overrides:
        key, value = parse_override(text)
        _set(data, key.split("."), value)
        overridden.append(key)
    passed: list[str] = []
    for name, value in settings.items():
        _merge_in(data, name, value, passed)
    return data, _Origin(label, tuple(overridden), tuple(passed))


def _merge_in(tree: dict[str, Any], key: str, value: Any, passed: list[str], prefix: str = "") -> None:
    """Set `tree[key]` to a keyword argument's value; a mapping merges into the section key by key.

    `passed` collects the dotted keys set, so an error names them as keyword arguments.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_dict(value)
    dotted = _join(prefix, key)
    if isinstance(value, Mapping) and isinstance(tree.get(key), Mapping):
        section = tree[key] = dict(tree[key])
        for name, inner in value.items():
            _merge_in(section, str(name), inner, passed, dotted)
        return
    tree[key] = value
    passed.append(dotted)


def from_dict(data: Mapping[str, Any], cls: type[T], where: str = "config") -> T:
    """Build `cls` from plain data (parsed YAML), checking every key and type against its field hints.

    Args:
        data: a mapping of field names to values; nested dataclass fields take nested mappings.
        cls: a dataclass type; its hints may be strings (`from __future__ import annotations`).
        where: the file name (or other label) errors start with.
    Returns:
        An instance of `cls`.
    Raises:
        UserError: unknown key, wrong type, value outside a Literal, or missing required key.
    """
    _check_top(data, where)
    return _build(data, cls, "", _Origin(where))


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-safe data (Paths as str, tuples as lists), e.g. for lmforge.yaml."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict wants a dataclass instance, got {type(obj).__name__}")
    return _plain(obj)


def dump(obj: Any, path: str | Path) -> None:
    """Write `to_dict(obj)` as YAML, in field order, so `load(path, type(obj))` gives `obj` back."""
    Path(path).write_text(to_yaml(to_dict(obj)), encoding="utf-8")


def to_yaml(data: Any) -> str:
    """Plain data as YAML text in key order, written so that `read_yaml` reads the same values back."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields, in field order, read from its source with `ast`.

    Fields without a docstring, or classes whose source is unavailable (REPL, exec), are left out.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if dataclasses.is_dataclass(klass):
            docs.update(_class_docs(klass))
    return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.name in docs}


@functools.cache
def _class_docs(klass: type) -> dict[str, str]:
    """Docstrings of one class body's annotated names: a string statement right after `name: type = ...`."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; every failure becomes a one-line UserError naming the file (and line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found: check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise UserError(f"{path}: cannot read config file ({reason}): pass a YAML file") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: {_yaml_problem(err)}") from None
    except _TAG_ERRORS as err:
        raise UserError(f"{path}: {_tag_problem(err)}") from None
    except RecursionError:
        raise UserError(f"{path}: values nest too deeply for the YAML reader: flatten them") from None
    check_shape(data, str(path))
    return {} if data is None else data  # an empty file means "all defaults"


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line error as one line with the 1-based line and column."""
    if isinstance(err, yaml.MarkedYAMLError) and (mark := err.problem_mark or err.context_mark):
        what = " ".join(str(err.problem or err.context or "syntax error").split())
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}: fix the syntax there"
    return "invalid YAML: " + " ".join(str(err).split())


def _check_top(data: Any, where: str) -> None:
    """The whole config must be `key: value` lines; a list or a scalar there is a mistake."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: the top level must be a mapping of key: value lines, got {_show(data)}")


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'a.b=value' and parse the value as YAML, so numbers, bools, lists and null work."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise UserError(f"override {text!r}: write it as key.sub=value, e.g. train.lr=3e-4")
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        what = " ".join(str(err.problem if isinstance(err, yaml.MarkedYAMLError) else err).split())
        raise UserError(f"override {text!r}: the value is not valid YAML ({what}): quote it or fix it") from None
    except _TAG_ERRORS as err:
        raise UserError(f"override {text!r}: {_tag_problem(err)}") from None
    except RecursionError:
        raise UserError(f"override {text!r}: the value nests too deeply: flatten it") from None
    check_shape(value, f"override {text!r}")
    return key, value


# What PyYAML's tag constructors raise instead of a YAMLError for a value they cannot read: `!!int x`
# (ValueError), `!!float ""` (IndexError), `!!bool x` (KeyError), `!!timestamp x` (AttributeError).
_TAG_ERRORS = (ValueError, IndexError, KeyError, AttributeError, TypeError)


def _tag_problem(err: Exception) -> str:
    what = " ".join(f"{type(err).__name__}: {err}".split())[:120]
    return f"a YAML tag (!!int, !!float, ...) cannot read its value ({what}): fix the value or remove the tag"


MAX_DEPTH = 64  # no config nests near this deep; the readers after this one recurse once per level


def check_shape(data: Any, where: str) -> None:
    """Refuse data that contains itself (`a: &x [*x]`: an alias inside its own anchor) or nests past
    MAX_DEPTH, which recursive readers would otherwise meet as a RecursionError. Walks each shared
    (aliased) value once, so `&a` used a million times costs one visit."""
    height: dict[int, int] = {}  # id -> levels below a finished container
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, finished = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        children = [c for c in (value.values() if isinstance(value, dict) else value) if isinstance(c, (dict, list))]
        if finished:
            on_path.discard(id(value))
            height[id(value)] = 1 + max((height[id(c)] for c in children), default=0)
            if height[id(value)] > MAX_DEPTH:
                raise UserError(f"{where}: values nest more than {MAX_DEPTH} levels deep: flatten them")
        elif id(value) in on_path:
            raise UserError(f"{where}: a YAML alias (*name) sits inside its own anchor (&name): write the value out")
        elif id(value) not in height:
            on_path.add(id(value))
            stack.append((value, True))
            stack.extend((child, False) for child in children)


def _set(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set a dotted key, copying each dict on the way (YAML anchors may share them) and replacing non-dicts."""
    for part in parts[:-1]:
        child = tree.get(part)
        child = tree[part] = dict(child) if isinstance(child, dict) else {}
        tree = child
    tree[parts[-1]] = value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved field types; `get_type_hints` turns string annotations back into types."""
    return get_type_hints(cls)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(data: Mapping[str, Any], cls: type[T], prefix: str, origin: _Origin) -> T:
    """One dataclass level: refuse unknown keys, convert known ones, leave the rest to their defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown(str(key), cls, prefix, origin)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], _hints(cls)[name], key, origin)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            doc = field_docs(cls).get(name, "")
            hint = f" ({doc.splitlines()[0].rstrip('.')})" if doc else ""
            fix = f"set it in the config file or pass {key}=VALUE"
            raise UserError(f"{origin.of(key)}: missing required key '{key}'{hint}: {fix}")
    try:
        return cls(**kwargs)
    except BadValue as err:  # a range check in __post_init__: name the full key and where it was set
        key = _join(prefix, err.field)
        raise UserError(f"{origin.of(key)}: {key} {err.problem}") from None


def _convert(value: Any, tp: Any, key: str, origin: _Origin) -> Any:
    """Check `value` against the type hint `tp` and return it converted (int->float, str->Path, list->tuple)."""
    kind = get_origin(tp) or tp
    args = get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(value, tp, key, origin)
    elif kind in (Union, types.UnionType):
        return _convert_union(value, tp, key, origin)
    elif kind is Literal:
        for allowed in args:  # the type check keeps True from matching Literal[1]
            if value == allowed and type(value) is type(allowed):
                return allowed
    elif kind in (list, tuple):
        if isinstance(value, (list, tuple)):
            return _convert_sequence(value, kind, args, key, origin)
    elif kind is dict:
        if isinstance(value, Mapping):
            key_tp, value_tp = args or (str, Any)
            return {
                _convert(k, key_tp, f"{key}.{k}", origin): _convert(v, value_tp, f"{key}.{k}", origin)
                for k, v in value.items()
            }
    elif kind in _SCALARS:
        if _SCALARS[kind](value):
            return kind(value)
    else:
        raise TypeError(f"lmforge.config cannot read fields of type {tp!r} (key {key!r})")
    raise _mismatch(value, tp, key, origin)


_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),  # 1 is a fine learning rate
    str: lambda v: isinstance(v, str),
    Path: lambda v: isinstance(v, Path) or (isinstance(v, str) and v != ""),  # Path("") would be "."
}


def _convert_union(value: Any, tp: Any, key: str, origin: _Origin) -> Any:
    """`X | None` and other unions: null where allowed, else the first arm that accepts the value."""
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(value, tp, key, origin)
    arms = [a for a in args if a is not type(None)]
    if len(arms) == 1 and isinstance(value, (Mapping, list, tuple)):
        return _convert(value, arms[0], key, origin)  # so errors name the exact nested key
    for arm in arms:
        with contextlib.suppress(UserError):
            return _convert(value, arm, key, origin)
    raise _mismatch(value, tp, key, origin)


def _convert_sequence(value: Sequence[Any], kind: type, args: tuple[Any, ...], key: str, origin: _Origin) -> Any:
    """`list[X]`, `tuple[X, ...]` and fixed `tuple[X, Y]`, each item checked under `key[i]`."""
    if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise UserError(
                f"{origin.of(key)}: key '{printable(key)}' must be a list of {len(args)} items, got {_show(value)}"
            )
        return tuple(_convert(v, a, f"{key}[{i}]", origin) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    item_tp = args[0] if args else Any
    items = [_convert(v, item_tp, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    return items if kind is list else tuple(items)


def _describe(tp: Any) -> str:
    """A type hint in words, with its article, for 'must be ...' messages."""
    kind = get_origin(tp) or tp
    names = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a str", Path: "a path (string)"}
    if tp is type(None):
        return "null"
    if kind in names:
        return names[kind]
    if kind is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if kind in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if kind in (list, tuple):
        return "a list"
    return "a mapping"  # dict and dataclass sections


def _show(value: Any) -> str:
    """A value and its type for an error message, kept short and on one line (repr escapes newlines)."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{text[:57] + '...' if len(text) > 60 else text} ({type(value).__name__})"


def printable(key: str) -> str:
    """A key as written, with line breaks and other control characters escaped so a message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)


def _mismatch(value: Any, tp: Any, key: str, origin: _Origin) -> UserError:
    return UserError(f"{origin.of(key)}: key '{printable(key)}' must be {_describe(tp)}, got {_show(value)}")


def _unknown(name: str, cls: type, prefix: str, origin: _Origin) -> UserError:
    """Suggest the same name in a nested section (`lr` -> `train.lr`), else a close key at the same level,
    else list the valid keys."""
    raw = _join(prefix, name)
    full = printable(raw)
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    close = [_join(prefix, k) for k in difflib.get_close_matches(name, valid, n=1, cutoff=0.5)]
    nested = [k for k in _dotted_keys(cls, prefix) if k.rsplit(".", 1)[-1] == name]
    if close or nested:
        return UserError(f"{origin.of(raw)}: unknown key '{full}': did you mean '{(nested or close)[0]}'?")
    under = f" under '{prefix}'" if prefix else ""
    return UserError(f"{origin.of(raw)}: unknown key '{full}': valid keys{under} are {', '.join(valid)}")


def _dotted_keys(cls: type, prefix: str) -> list[str]:
    """Every dotted key below `cls`, through nested (and optional) dataclass sections."""
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(prefix, f.name)
        keys.append(key)
        tp = _hints(cls)[f.name]
        for arm in get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,):
            if dataclasses.is_dataclass(arm):
                keys += _dotted_keys(arm, key)
    return keys


def _plain(value: Any) -> Any:
    """Recursive helper of `to_dict`; init=False fields are derived, so they are not written."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
