"""Every example config in configs/ loads into its command's config class [lg test_config_hub]."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge import config as config_io
from lmforge.finetune.sft import SFTConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("sft_*.yaml"))


def _leaves(data: dict, prefix: str = "") -> dict:
    """{"train.lr": 5e-4, ...}: the dotted keys of nested sections."""
    out = {}
    for key, value in data.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_sft_config_loads(path):
    written = _leaves(yaml.safe_load(path.read_text()))
    resolved = _leaves(config_io.to_dict(config_io.load(path, SFTConfig)))
    assert {key: resolved.get(key, "<missing>") for key in written} == written  # every value in the file arrives


def test_there_are_configs():
    assert CONFIGS
