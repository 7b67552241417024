"""The public API names stay callable after their packages are imported."""

from __future__ import annotations

import importlib

import pytest

import lmforge


@pytest.mark.parametrize(
    "name, target",
    [("finetune", "lmforge.finetune.sft"), ("merge", "lmforge.merge.run"), ("distill", "lmforge.distill.run")],
)
def test_package_named_like_a_function_forwards_calls(name, target, monkeypatch):
    module = importlib.import_module(target)  # binds lmforge.<name> to the package
    monkeypatch.setattr(module, name, lambda *args, **kwargs: ("called", args, kwargs))
    assert getattr(lmforge, name)("cfg.yaml", overwrite=True) == ("called", ("cfg.yaml",), {"overwrite": True})
