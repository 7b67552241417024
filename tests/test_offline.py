"""No network at run time unless the user names a hub model: importing PEFT (every LoRA run does) must not
reach for the Hugging Face Hub, which bitsandbytes 0.50 does through `kernels` on CPUs with AVX512-BF16."""

from __future__ import annotations

import subprocess
import sys

WATCH = """
import socket
lookups = []
real = socket.getaddrinfo
socket.getaddrinfo = lambda *a, **k: lookups.append(a[0]) or real(*a, **k)
{imports}
print("LOOKUPS", lookups)
"""


def lookups_while(imports: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", WATCH.format(imports=imports)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_lora_run_imports_peft_without_any_network_lookup():
    """lora.py / dpo.py / load.py import lmforge.models.compat before PEFT, as this does."""
    assert lookups_while("import lmforge.finetune.lora, lmforge.finetune.dpo, peft") == "LOOKUPS []"


def test_quantize_imports_bitsandbytes_offline():
    assert lookups_while("import lmforge.models.quantize, bitsandbytes") == "LOOKUPS []"
