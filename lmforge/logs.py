"""How the `lmforge` command logs: its own lines as `lmforge: message`, other libraries' under their name.

lmforge's loggers (`lmforge.*`) print from INFO up; every other library's records only from WARNING up and
prefixed with their logger's name, so each stderr line says whose it is. Before this, the root logger
printed every library's INFO records as `lmforge: ...` (torch's "FakeTensor cache stats" at exit after a
Ctrl-C, alembic's "Context impl SQLiteImpl." from Optuna's study file).
"""

from __future__ import annotations

import logging
import os
import sys

OWN = "lmforge"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        self._style._fmt = (
            "lmforge: %(message)s"
            if record.name == OWN or record.name.startswith(OWN + ".")
            else "%(name)s: %(levelname)s: %(message)s"
        )
        return super().format(record)


def configure() -> None:
    """Set up stderr logging for a command process (the CLI, a recipe's step child)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # Under accelerate launch / torchrun every rank runs the command: rank 0 tells the story, the others
    # print only warnings and errors (otherwise each line would appear once per process).
    other_rank = os.environ.get("RANK", "0") not in ("", "0")
    logging.getLogger(OWN).setLevel(logging.WARNING if other_rank else logging.INFO)
