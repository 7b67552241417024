"""What a training command prints while the loop runs: one line per step and per evaluation.

Every trainer (finetune, dpo, distill) passes `print_progress(max_steps, on_log)` as the loop's `on_log`, so
the lines read the same whichever loss is trained; `also` receives every record first (tune's pruning,
tests' interruptions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger("lmforge.train")


def print_progress(max_steps: int, also: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """Log each step with loss, throughput and time left, and each evaluation; then call `also`."""
    seen = {"input_tokens": 0}

    def show(entry: dict) -> None:
        if also is not None:
            also(entry)
        if "loss" in entry:
            seen["input_tokens"] += entry.get("input_tokens", 0)
            elapsed = max(entry["elapsed_s"], 1e-9)
            eta = elapsed / entry["step"] * (max_steps - entry["step"])
            log.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %.0fs elapsed  ETA %.0fs",
                entry["step"],
                max_steps,
                entry["loss"],
                entry["lr"],
                seen["input_tokens"] / elapsed,
                elapsed,
                eta,
            )
        elif "eval" in entry:
            log.info("step %d  eval %s", entry["step"], entry["eval"])

    return show
