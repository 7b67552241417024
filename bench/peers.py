"""What every peer benchmark needs: the peer in its own virtualenv, and a child process measured alone.

`ensure_peer_venv` installs the CPU torch wheel first (a bare torch requirement pulls a multi-GB CUDA
build), then the peer with the libraries both sides share pinned to lmforge's versions, so a comparison is
between the tools, not library releases. `measure` runs one command and reads its wall time, CPU time and
peak RSS from os.wait4, so each tool is measured in a process of its own, launched from a small interpreter so
the benchmark script's own memory does not count.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk; a bare torch requirement pulls a CUDA build
# The merge benchmarks' peer: conformance and speed are measured against this release, in its own virtualenv
# (ignored by git; `make test` builds it once for tests/test_merge_conformance.py, then reuses it).
MERGEKIT_VENV, MERGEKIT = ROOT / "bench" / ".venv-mergekit", "mergekit==0.1.5"


def installed_version(python: Path, distribution: str) -> str | None:
    """Version of `distribution` in the environment of `python`, or None."""
    if not python.is_file():
        return None
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_peer_venv(venv: Path, peer: str, distribution: str, shared_pins: tuple[str, ...]) -> Path:
    """Create (or reuse) the peer's virtualenv holding `peer` (a pip spec NAME==VERSION); return its python."""
    python = venv / "bin" / "python"
    if installed_version(python, distribution) == peer.split("==")[1]:
        return python
    print(f"installing {peer} into {venv} (a few minutes) ...", flush=True)
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # first, so the peer's torch requirement is already met
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in shared_pins]
    subprocess.run([*pip, peer, *pins], check=True)
    return python


def ensure_mergekit() -> Path:
    """mergekit 0.1.5's python in bench/.venv-mergekit, installed there first when it is not."""
    return ensure_peer_venv(MERGEKIT_VENV, MERGEKIT, "mergekit", ())


# Linux carries a process's RSS high-water mark across fork + exec, so a child of a benchmark script that has
# imported torch reports at least the script's own peak RSS (`true` launched from a 600 MB Python reports 611 MB).
# The launcher is a fresh small interpreter that forks the tool and writes the tool's own ru_maxrss (KiB, from
# wait4) into argv[1]; the tool's children are included, as wait4 counts waited-for descendants.
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: dies with the launcher (measure's timeout)
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(command: list[str], env: dict[str, str], log: Path, timeout_s: float) -> tuple[float, float, float]:
    """Run `command` to completion: (wall seconds, CPU seconds, peak RSS MB of the command and its descendants)."""
    rss_file = log.with_name(log.name + ".maxrss")
    launched = [sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *command]
    with open(log, "w") as handle:
        start = time.perf_counter()
        child = subprocess.Popen(launched, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        timer = threading.Timer(timeout_s, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{command[0]} exited with {code}; last lines of {log}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, int(rss_file.read_text()) / 1024  # ru_maxrss is KiB on Linux


def main_python() -> Path:
    """lmforge's own interpreter: the project virtualenv when it exists."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    return venv_python if venv_python.is_file() else Path(sys.executable)


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


if __name__ == "__main__":  # `make test`: build the mergekit virtualenv once, reuse it after
    print(f"mergekit peer: {ensure_mergekit()}")
