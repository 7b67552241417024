"""Output folders appear whole or not at all.

Every command writes into a hidden staging folder beside the target and renames it into place at the
end, so an interrupted or failed run leaves no half output. An existing target is refused unless the
caller allows overwriting.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import UserError


@contextmanager
def staged_output(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging folder; on success it becomes `target`, on any error it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"output folder {target} exists: pass --overwrite or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
