"""A verb's command line as a config: `[CONFIG.yaml] [key.sub=value ...]` plus its flags, as overrides.

Flags are the common keys under short names (`--steps` is `train.max_steps`). A flag and an override that set
one key to different values are an error naming both, instead of the flag silently winning; flags go last, so
they win over the config file. Values are written as JSON, which YAML reads back exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from lmforge.config import parse_override
from lmforge.errors import UserError


def command_line(args: Sequence[str] | None, flags: Mapping[str, tuple[str, Any]]) -> tuple[str | None, list[str]]:
    """A verb's `[CONFIG.yaml] [key.sub=value ...]` arguments and its flags as (config path, overrides).

    Args:
        args: the positional arguments; a first one ending in .yaml/.yml is the config file.
        flags: "--steps" -> ("train.max_steps", value) for each flag of the verb; None (or False for a
            switch) means the flag was not given.
    Returns:
        The config path (or None) and the overrides, the flags' last so that they win over the file.
    Raises:
        UserError: a flag and an override set the same key to different values (naming both).
    """
    args = list(args or [])
    config = args.pop(0) if args and args[0].endswith((".yaml", ".yml")) else None
    given = {flag: (key, value) for flag, (key, value) in flags.items() if value is not None and value is not False}
    for text in args:
        key, value = parse_override(text)
        for flag, (flag_key, flag_value) in given.items():
            if key == flag_key or flag_key.startswith(key + "."):
                theirs, ours = _at(value, flag_key[len(key) + 1 :]), flag_value
            elif key.startswith(flag_key + "."):
                theirs, ours = value, _at(flag_value, key[len(flag_key) + 1 :])
            else:
                continue
            if theirs is not _ABSENT and ours is not _ABSENT and theirs != ours:
                shown = "" if flag_value is True else f" {json.dumps(flag_value)}"
                raise UserError(
                    f"{flag}{shown} and override '{text}' set {flag_key} to different values: give only one of them"
                )
    return config, args + [f"{key}={json.dumps(value)}" for key, value in given.values()]


_ABSENT = object()


def _at(value: Any, dotted: str) -> Any:
    """The part of a parsed value at a dotted path below it ('' is the value itself), or _ABSENT."""
    for part in dotted.split(".") if dotted else ():
        if not isinstance(value, Mapping) or part not in value:
            return _ABSENT
        value = value[part]
    return value
