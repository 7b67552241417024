"""The `lmforge moe` verb: `lmforge moe CONFIG.yaml OUT`, mergekit-moe's command line.

mergekit-moe's own flags that matter here act (--random-seed, --device, --i-understand-this-is-not-useful-
without-training); its quantised hidden-state pass (--load-in-4bit/8bit) is refused, since it changes the
router rows. Imports stay inside the function so `lmforge --help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.errors import UserError


def moe_command(
    config: Annotated[Path, typer.Argument(help="mergekit-moe YAML (base_model, experts, gate_mode, ...)")],
    out: Annotated[Path, typer.Argument(help="output model folder")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    random_seed: Annotated[int, typer.Option(help="seed of gate_mode random/uniform_random and noise_scale")] = 0,
    device: Annotated[str, typer.Option(help="where the hidden-state pass runs: cpu, cuda")] = "cpu",
    allow_all_same: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-is-not-useful-without-training", help="build even if every expert is one model"
        ),
    ] = False,
    load_in_4bit: Annotated[bool, typer.Option(hidden=True)] = False,
    load_in_8bit: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Build a mixture of experts from fine-tunes of one model (mergekit-moe's YAML, unchanged)."""
    if load_in_4bit or load_in_8bit:
        raise UserError("--load-in-4bit/--load-in-8bit: lmforge computes router rows in float32; drop the flag")
    from rich.console import Console

    from lmforge.merge.moe import moe

    folder = moe(config, out, overwrite=overwrite, seed=random_seed, device=device, allow_all_same=allow_all_same)
    Console().print(f"mixture of experts in {folder}")
