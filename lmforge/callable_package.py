"""Packages that are also the public function of the same name (`lmforge.merge`, `lmforge.finetune`, ...).

`lmforge.merge(...)` is a function of the lazy public API, and `lmforge.merge` is also a package: once
anything imports `lmforge.merge.run`, Python binds the attribute to the package and the lazy function is
shadowed. Making the package itself callable (forwarding to the function) keeps `lmforge.NAME(...)`
working whichever of the two the name holds.
"""

from __future__ import annotations

import importlib
import sys
import types


def forward_calls(package: str, target: str) -> None:
    """Make module `package` callable: calling it calls `target` ("module.path:function")."""
    module_name, function = target.split(":")

    class CallablePackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(importlib.import_module(module_name), function)(*args, **kwargs)

    sys.modules[package].__class__ = CallablePackage
