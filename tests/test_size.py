"""Small by rule (STYLE.md 1.3): no module over 600 lines, and a budget for the whole package."""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmforge"
MODULE_LIMIT = 600
PACKAGE_BUDGET = 15_000  # raise deliberately, in its own commit, when a new capability lands


def test_no_module_over_the_limit():
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MODULE_LIMIT} == {}


def test_package_within_line_budget():
    total = sum(len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py"))
    assert 0 < total <= PACKAGE_BUDGET
