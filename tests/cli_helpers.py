"""Running the `lmforge` command in the test's own process, through its real entry point."""

from __future__ import annotations

import sys

from lmforge import cli


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `lmforge ARGS`; stdout and stderr are captured, so not a terminal."""
    monkeypatch.setattr(sys, "argv", ["lmforge", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exit_:
        code = exit_.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err
