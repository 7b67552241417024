"""Terminal tables: the scores and footprint of a results dict, readable at a glance.

Piped or redirected, rich fits tables to 80 columns and cuts long cells (`model.layers.0…`), which helps
nobody reading a file; `table_console` gives such output a console as wide as the tables need.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 10_000
"""Columns of a console that is not a terminal: wide enough that no table cell is cut or wrapped."""


def table_console(console: Console | None = None) -> Console:
    """`console` (default: stdout) on a terminal; otherwise a console writing to the same file whose width
    never cuts a table cell (a table is as wide as its content, not as the console)."""
    console = console or Console()
    if console.is_terminal:
        return console
    return Console(file=console.file, width=PIPED_WIDTH, no_color=console.no_color, highlight=False)


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def scores_table(results: dict) -> Table:
    """One row per task and metric: value ± standard error, and how many records were scored."""
    table = Table(title=f"scores: {results['config']['model']}")
    for column in ("task", "metric", "value", "± stderr", "n", "n-shot"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, row in results["results"].items():
        for key, value in row.items():
            if "," not in key or "_stderr," in key:
                continue
            metric = key.split(",")[0]
            table.add_row(
                task,
                metric,
                _format(value),
                _format(row.get(f"{metric}_stderr,none")),
                str(results["n-samples"][task]["effective"]),
                str(results["n-shot"][task]),
            )
    return table


def footprint_table(footprint: dict) -> Table:
    table = Table(title="footprint")
    table.add_column("measure")
    table.add_column("value", justify="right")
    mib = 1024 * 1024
    rows = [
        ("parameters", f"{footprint['params_total']:,}"),
        ("size on disk", f"{footprint['size_bytes'] / mib:,.1f} MiB"),
        ("load time", f"{footprint['load_s']:.2f} s"),
        ("peak RSS", f"{footprint['peak_rss_bytes'] / mib:,.0f} MiB"),
        ("prompt throughput", f"{footprint['prompt_tokens_per_s']:,.0f} tokens/s"),
        ("generation latency", f"{footprint['ms_per_token']:.1f} ms/token"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_results(results: dict, console: Console | None = None) -> None:
    console = table_console(console)
    console.print(scores_table(results))
    if results.get("footprint"):
        console.print(footprint_table(results["footprint"]))
