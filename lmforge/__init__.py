"""lmforge: fine-tune, distill and merge language models, and compare the results under one harness.

The public API is the names in `__all__`. Each is imported on first use (PEP 562 `__getattr__`), so that
`lmforge --help` and the CLI start without loading torch, and each name is the function itself, so
`help(lmforge.finetune)` shows its signature and docstring. The commands (`finetune`, `dpo`, `tune`,
`distill`, `merge`, `evaluate`, `run`) take their config the same way: a YAML path, a dict, or the keys as
keyword arguments, plus "key.sub=value" overrides (lmforge/config.py `resolve`).

`finetune`, `distill`, `edit` and `merge` are also subpackages, and Python binds a subpackage to its parent's
attribute when it is first imported, hiding the function. So they are imported here first (their
`__init__.py` files import nothing) and their names removed again: a later `import lmforge.merge.run` finds
the package in `sys.modules` and leaves `lmforge.merge` to `__getattr__`. Import from them with
`from lmforge.merge.run import merge`, not `import lmforge.merge.run` and dotted access.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> "module:attribute" it lives in.
_API = {
    "load_model": "lmforge.models.load:load_model",
    "resolve_model": "lmforge.models.load:resolve_model",
    "export_gguf": "lmforge.models.gguf_export:export_gguf",
    "evaluate": "lmforge.eval.run:evaluate",
    "run_eval": "lmforge.eval.run:run_eval",
    "finetune": "lmforge.finetune.sft:finetune",
    "dpo": "lmforge.finetune.dpo:dpo",
    "tune": "lmforge.finetune.search:tune",
    "distill": "lmforge.distill.run:distill",
    "merge": "lmforge.merge.run:merge",
    "moe": "lmforge.merge.moe:moe",
    "edit": "lmforge.edit.run:edit",
    "run": "lmforge.recipe.runner:run_recipe",
    "run_recipe": "lmforge.recipe.runner:run_recipe",
    "load_records": "lmforge.data.sources:load_records",
    "split_records": "lmforge.data.sources:split_records",
    "render_example": "lmforge.data.chat:render_example",
    "make_tiny_llama": "lmforge.models.tiny:make_tiny_llama",
    "TASKS": "lmforge.eval.tasks:TASKS",
    "UserError": "lmforge.errors:UserError",
    "demo": "lmforge.recipe.demo:demo",
    "compare": "lmforge.report.compare:compare",
}
__all__ = sorted(_API)

for _package in ("distill", "edit", "finetune", "merge"):
    importlib.import_module(f"{__name__}.{_package}")
    del globals()[_package]
del _package


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lmforge' has no attribute '{name}'")
    module, attribute = _API[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
