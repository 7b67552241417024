"""Quiet one rename in transformers 5 that lmforge and PEFT reach on every LoRA or checkpointed run.

transformers 5.x (after 5.0) renamed gradient checkpointing to activation checkpointing and warns with a
FutureWarning on each use of the old names: PEFT 0.21 reads `model.is_gradient_checkpointing` whenever it
wraps a model, and the loop enables checkpointing by the old name. The new names cannot be used instead:
transformers 5.0, which the declared range admits, does not have them. So exactly these warnings are
ignored around those calls, and no other.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

RENAMED = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"
"""The message of transformers' FutureWarning for each old name."""


@contextmanager
def checkpointing_rename_quiet() -> Iterator[None]:
    """Inside: transformers' FutureWarnings about the gradient -> activation checkpointing rename are ignored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RENAMED, category=FutureWarning)
        yield
