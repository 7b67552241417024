"""Give freed activation memory back to the OS during CPU training (glibc only; `train.release_memory`).

glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB on 64-bit),
so after the first backward pass the multi-MB activation buffers of every step come from the heap, and a
fragmented heap is not returned to the OS. Peak RSS then climbs well above what the tensors need. Fixing the
thresholds (as MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would) keeps large buffers in mmap, which
free() unmaps at once; the price is page faults (system time) each time such a buffer is made again.
On the finetune benchmark's workload (SmolLM2-135M LoRA, batch 8 x ~74 tokens, 6 steps, one thread):

| mmap threshold | peak RSS | system CPU s |
|---|---|---|
| glibc default (grows to 32 MiB) | 2.62 GB | 3.0 |
| 128 KiB fixed | 1.75 GB | 18.7 |
| 1 MiB fixed | 1.84-1.89 GB | 4.3-10.1 |
| 4 MiB fixed | 2.60 GB | 2.0 |

512 KiB (ours since the distillation benchmark; 1 MiB before) sends activation-sized buffers (a batch's hidden
states and up) to mmap and keeps small tensors on the heap: most of the memory saving for a fraction of the fault
cost. On the distillation benchmark's cached-signal run (batch 4 x ~70 tokens: hidden states of ~0.6 MB, which
1 MiB missed; optimiser stepped in backward, checkpointing) the training peak was 1.62 GB at 1 MiB, 1.57 at
512 KiB, 1.57 at 256 KiB and 1.55 at 128 KiB (docs/benchmarks.md, sixth round). On a quiet machine the
faults still cost ~30% of training speed, so the loop only does this when asked; splitting batches by tokens
(loop.py) saves about as much memory at full speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("lmforge")

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 512 * 1024  # buffers this size and up are mmapped (see the table above)
TRIM_THRESHOLD_BYTES = 128 * 1024  # glibc's default trim threshold, kept fixed instead of growing
_done = False


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap and trim thresholds once per process; True when they are set.

    Does nothing when the user set either MALLOC_* variable (their choice wins), or on a libc
    without mallopt (macOS, musl builds without it, Windows).
    """
    global _done
    if _done:
        return True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not _done:
        log.debug("mallopt refused the thresholds; peak RSS may run higher than the tensors need")
    return _done
