"""What a test does when a tool it needs (the mergekit peer, a headless Chromium) is not installed.

Locally it skips, so the suite runs on a bare machine. Under CI (env CI=true, as `.ci/run` is run) it fails:
`make test` installs both, so a missing one there means the test would pass without having run.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def tool_missing(why: str) -> None:
    """Skip with `why`; under CI=true, fail with it instead."""
    if in_ci():
        pytest.fail(f"{why} (CI=true: `make test` installs it; a test that needs it may not skip in CI)")
    pytest.skip(why)
