"""The report's plots as PNG bytes (matplotlib, Agg: no display needed), ready to inline as base64.

Four pictures, each drawn only when its data exists: score per task per model (one panel per task,
lower-is-better tasks say so); quality vs size; quality vs cost to make (wall seconds of the making run;
a model not made here sits at 0); training curves from each made model's log.jsonl. "Quality" is the mean
headline score over the higher-is-better tasks, so it is comparable across the models of one report.
"""

from __future__ import annotations

import io

from lmforge.report.rows import LOWER_IS_BETTER, MIB, Comparison, Row

DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(figure)
    return buffer.getvalue()


def quality(row: Row, tasks: list[str]) -> float | None:
    """Mean headline score over the higher-is-better tasks the row was scored on."""
    cells = [row.scores[t] for t in tasks if t in row.scores]
    values = [c["value"] for c in cells if c["metric"] not in LOWER_IS_BETTER]
    return sum(values) / len(values) if values else None


def scores_png(comparison: Comparison) -> bytes | None:
    rows, tasks = comparison.rows, comparison.tasks
    if not tasks:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(len(tasks), 1, figsize=(max(6, 0.7 * len(rows) + 2), 2.6 * len(tasks)), squeeze=False)
    for axis, task in zip(axes[:, 0], tasks, strict=True):
        labels = [r.label for r in rows if task in r.scores]
        values = [r.scores[task]["value"] for r in rows if task in r.scores]
        errors = [r.scores[task].get("stderr") or 0.0 for r in rows if task in r.scores]
        metric = next(r.scores[task]["metric"] for r in rows if task in r.scores)
        colors = ["#888888" if label == comparison.baseline else "#3b6ea5" for label in labels]
        axis.bar(labels, values, yerr=errors, color=colors, capsize=3)
        axis.set_title(f"{task}: {metric}" + (" (lower is better, log scale)" if metric in LOWER_IS_BETTER else ""))
        if metric in LOWER_IS_BETTER:
            axis.set_yscale("log")  # one broken model must not flatten every other bar
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    return _png(figure)


def _scatter(comparison: Comparison, x_of, x_label: str) -> bytes | None:
    points = [(x_of(r), quality(r, comparison.tasks), r.label) for r in comparison.rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    axis.scatter([p[0] for p in points], [p[1] for p in points], color="#3b6ea5")
    for x, y, label in points:
        axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel(x_label)
    axis.set_ylabel("mean task score")
    axis.grid(alpha=0.3)
    return _png(figure)


def size_png(comparison: Comparison) -> bytes | None:
    def size(row: Row):
        value = row.footprint.get("size_bytes")
        return value / MIB if value else None

    return _scatter(comparison, size, "size on disk (MiB)")


def cost_png(comparison: Comparison) -> bytes | None:
    def cost(row: Row) -> float:
        return (row.cost or {}).get("wall_s") or 0.0

    return _scatter(comparison, cost, "wall seconds to make (0: not made here)")


def curves_png(comparison: Comparison) -> bytes | None:
    rows = [r for r in comparison.rows if any("loss" in e for e in r.curve)]
    if not rows:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        train = [(e["step"], e["loss"]) for e in row.curve if "loss" in e]
        line = axis.plot([s for s, _ in train], [v for _, v in train], label=f"{row.label} train")[0]
        evals = [e for e in row.curve if isinstance(e.get("eval"), dict) and "val_loss" in e["eval"]]
        val = [(e["step"], e["eval"]["val_loss"]) for e in evals]
        if val:
            axis.plot([s for s, _ in val], [v for _, v in val], "o--", color=line.get_color(), label=f"{row.label} val")
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return _png(figure)


PLOTS = {
    "scores": scores_png,
    "quality_vs_size": size_png,
    "quality_vs_cost": cost_png,
    "training_curves": curves_png,
}


def render_all(comparison: Comparison) -> dict[str, bytes]:
    """Name -> PNG bytes for every plot whose data exists."""
    images = {}
    for name, draw in PLOTS.items():
        png = draw(comparison)
        if png:
            images[name] = png
    return images
