"""The comparison's data: one `Row` per model, tables as strings, and the whole `Comparison`.

Kept apart from compare.py, which builds them, so the renderers (html.py, plots.py) read the same types
without importing the builder that calls them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "byte_perplexity"}
MIB = 1024 * 1024


@dataclass(eq=False)  # rows are compared by identity (a row is one model)
class Row:
    """One model: its scores, footprint and what it cost to make."""

    label: str
    method: str
    family: str
    folder: str | None
    scores: dict[str, dict]
    """task -> {metric, value, stderr}: the headline metric."""
    footprint: dict
    cost: dict | None
    """wall_s, cpu_s, peak_rss_bytes, tokens_seen of the run that made the model (None: not made here)."""
    producer: dict | None = None
    sources: list[str] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)


@dataclass
class TableData:
    """A table as strings, rendered alike on the terminal, in report.md and in report.html."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Comparison:
    title: str
    rows: list[Row]
    baseline: str
    tasks: list[str]
    tables: list[TableData]
    verdicts: dict[str, str]
