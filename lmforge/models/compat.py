"""Quiet one rename in transformers 5 that lmforge and PEFT reach on every LoRA or checkpointed run, and keep
bitsandbytes off the network.

transformers 5.x (after 5.0) renamed gradient checkpointing to activation checkpointing and warns with a
FutureWarning on each use of the old names: PEFT 0.21 reads `model.is_gradient_checkpointing` whenever it
wraps a model, and the loop enables checkpointing by the old name. The new names cannot be used instead:
transformers 5.0, which the declared range admits, does not have them. So exactly these warnings are
ignored around those calls, and no other.

bitsandbytes 0.50, imported on a CPU with AVX512-BF16, asks the Hugging Face Hub for a kernel through the
`kernels` package (a dependency of transformers 5), and PEFT imports bitsandbytes whenever it is installed: every
LoRA run would reach for the network (measured: two DNS lookups of huggingface.co on `import peft`). Importing
this module imports bitsandbytes first with `kernels` hidden, so it uses its own CPU code and stays offline; every
lmforge module that imports PEFT imports this one before it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
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


def import_bitsandbytes_offline() -> None:
    """Import bitsandbytes, when installed, with `kernels` unimportable, so it never asks the hub for a kernel."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    # It logs a warning when the kernel is missing: that is the fallback lmforge wants, so nothing to tell.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    kernels = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken install is reported where it is used (PEFT; lmforge.models.quantize)
        pass
    finally:
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels


import_bitsandbytes_offline()
