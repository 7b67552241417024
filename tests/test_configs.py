"""Every example config in configs/ loads into its command's config class, every value it sets intact
[lg test_config_hub]. (merge_*.yaml are mergekit files: tests/test_merge.py reads them.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge import config as config_io
from lmforge.distill.run import DistillConfig
from lmforge.finetune.sft import SFTConfig

FOLDER = Path(__file__).resolve().parent.parent / "configs"
CLASSES = {"sft": SFTConfig, "distill": DistillConfig}
CONFIGS = sorted(p for p in FOLDER.glob("*.yaml") if p.name.split("_")[0] in CLASSES)


def _leaves(data, prefix: str = "") -> dict:
    """{"train.lr": 5e-4, "objectives.0.loss": "ce", ...}: the dotted keys of nested sections and lists."""
    if isinstance(data, list):
        data = dict(enumerate(data))
    if not isinstance(data, dict):
        return {prefix.removesuffix("."): data}
    out = {}
    for key, value in data.items():
        out |= _leaves(value, f"{prefix}{key}.")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_every_value(path):
    written = _leaves(yaml.safe_load(path.read_text()))
    resolved = _leaves(config_io.to_dict(config_io.load(path, CLASSES[path.name.split("_")[0]])))
    assert {key: resolved.get(key, "<missing>") for key in written} == written


def test_there_are_configs_of_each_kind():
    assert {p.name.split("_")[0] for p in CONFIGS} == set(CLASSES)
