"""Every example config in configs/ loads into its command's config class [lg test_config_hub]."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import config as config_io
from lmforge.finetune.sft import SFTConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("sft_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_sft_config_loads(path):
    cfg = config_io.load(path, SFTConfig)
    assert cfg.train.lr > 0 and cfg.output


def test_there_are_configs():
    assert CONFIGS
