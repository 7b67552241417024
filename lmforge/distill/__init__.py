"""Distillation: teacher to smaller student through the one training loop (see run.py).

The package is callable: `lmforge.distill(config, overrides)` works whether the name holds the lazy public
function or this package (see lmforge/callable_package.py).
"""

from lmforge.callable_package import forward_calls

forward_calls(__name__, "lmforge.distill.run:distill")
