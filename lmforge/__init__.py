"""lmforge: fine-tune, distill and merge language models, and compare the results under one harness.

The public API is the names below; each is imported on first use so that `lmforge --help` and the
CLI start without loading torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> "module:attribute" it lives in.
_API = {
    "load_model": "lmforge.models.load:load_model",
    "resolve_model": "lmforge.models.load:resolve_model",
    "evaluate": "lmforge.eval.run:evaluate",
    "run_eval": "lmforge.eval.run:run_eval",
    "finetune": "lmforge.finetune.sft:finetune",
    "dpo": "lmforge.finetune.dpo:dpo",
    "tune": "lmforge.finetune.search:tune",
    "distill": "lmforge.distill.run:distill",
    "merge": "lmforge.merge.run:merge",
    "load_records": "lmforge.data.sources:load_records",
    "split_records": "lmforge.data.sources:split_records",
    "render_example": "lmforge.data.chat:render_example",
    "make_tiny_llama": "lmforge.models.tiny:make_tiny_llama",
    "TASKS": "lmforge.eval.tasks:TASKS",
    "UserError": "lmforge.errors:UserError",
    "run_recipe": "lmforge.recipe.runner:run_recipe",
    "demo": "lmforge.recipe.demo:demo",
    "compare": "lmforge.report.compare:compare",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lmforge' has no attribute '{name}'")
    module, attribute = _API[name].split(":")
    return getattr(importlib.import_module(module), attribute)
