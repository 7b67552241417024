"""`lmforge compare RUN...`: one table from any run folders, deltas against a baseline, and the report.

Reads top to bottom: read each folder's run.json; an eval run is joined with the run that made its model
(the model folder's own run.json: finetune, merge, distill), so one row holds a model's scores, footprint
and cost to make; a making run without an eval stands on its own metrics. Each task shows one headline
metric (exact_match, acc, then perplexity: lower is better). The method table then answers the source
document's question with this run's numbers: per model, the score gained per task, wall time and peak
memory to make it, its size, what it kept of other skills (probe perplexity, other tasks, a merge's share
of each expert's gain, a student's share of its teacher's score), and a plain verdict that says when a
method did not pay off. Thresholds for the verdicts are constants below, never tuned to a result.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.errors import UserError
from lmforge.outputs import staged_output
from lmforge.report import html, plots
from lmforge.report.record import RunMeter, run_record, write_json
from lmforge.report.rows import LOWER_IS_BETTER, MIB, Comparison, Row, TableData
from lmforge.report.tables import table_console

HEADLINE = ("exact_match", "acc", "acc_norm", "perplexity", "bits_per_byte")
FAMILIES = {"finetune": "fine-tuning", "distill": "distillation", "merge": "merge", "edit": "edit"}
KEEPS = 0.8  # a merge pays off when it keeps this share of every expert's gain
RETAINS = 0.9  # a student pays off when it keeps this share of its teacher's score ...
FASTER = 1.2  # ... and generates at least this much faster
GENERAL = 2.0  # ... and its probe perplexity is at most this multiple of the teacher's (issue 17)
FORGETS = 0.10  # probe perplexity up by more than this share counts as forgetting
FUSED_COST = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_bytes": None, "tokens_seen": 0}  # nothing trained or written


def headline(metrics: dict) -> dict | None:
    """The metric a task is judged by: the first of HEADLINE that the task reports."""
    for metric in HEADLINE:
        if metric in metrics and isinstance(metrics[metric], dict) and metrics[metric].get("value") is not None:
            cell = metrics[metric]
            return {"metric": metric, "value": float(cell["value"]), "stderr": cell.get("stderr")}
    return None


def read_record(folder: Path) -> dict:
    path = folder / "run.json"
    if not folder.exists():
        raise UserError(f"run folder {folder} does not exist: check the path (a typo, or a run not made yet)")
    if not path.is_file():
        raise UserError(f"{folder} has no run.json: pass folders written by lmforge commands (eval, finetune, ...)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path} is not valid JSON: rerun the command that wrote it") from None


def _split_spec(spec: str) -> tuple[str | None, Path]:
    """'label=path' or 'path'."""
    label, sep, path = spec.partition("=")
    if sep and label and "/" not in label and not Path(spec).exists():
        return label, Path(path)
    return None, Path(spec)


def _producer_of(model_folder: str | None) -> tuple[Path, dict] | None:
    if not model_folder:
        return None
    folder = Path(model_folder)
    record_path = folder / "run.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return (folder, record) if record.get("command") != "eval" else None


def _curve(folder: Path) -> list[dict]:
    log = folder / "log.jsonl"
    if not log.is_file():
        return []
    entries = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in entries if "step" in e and ("loss" in e or "eval" in e)]


def _cost(record: dict) -> dict:
    return {key: record.get(key) for key in ("wall_s", "cpu_s", "peak_rss_bytes", "tokens_seen")}


def task_scores(metrics: dict) -> dict[str, dict]:
    """{task: headline cell} of a run record's metrics (the footprint left out)."""
    out = {}
    for task, task_metrics in (metrics or {}).items():
        if task == "footprint" or not isinstance(task_metrics, dict):
            continue
        cell = headline(task_metrics)
        if cell:
            out[task] = cell
    return out


def _method(record: dict | None) -> tuple[str, str]:
    if record is None:
        return "as is", "model"
    command = record.get("command", "?")
    family = FAMILIES.get(command, command)
    return (record.get("method") or command), family


def load_rows(specs: list[str]) -> list[Row]:
    """Rows from run folders (`path` or `label=path`); eval runs are joined with the run that made their model."""
    if not specs:
        raise UserError("no run folder given: pass eval/finetune/merge/distill output folders")
    entries = []
    for spec in specs:
        label, folder = _split_spec(spec)
        entries.append((label, folder, read_record(folder)))
    covered = set()
    for _, _, record in entries:
        if record.get("command") == "eval":
            made = _producer_of(record.get("inputs", {}).get("model", {}).get("folder"))
            if made:
                covered.add(made[0].resolve())
    rows: list[Row] = []
    for label, folder, record in entries:
        if record.get("command") == "eval":
            model = record.get("inputs", {}).get("model", {})
            made = _producer_of(model.get("folder"))
            producer = made[1] if made else None
            name = label or (made[0].name if made else Path(str(model.get("ref", folder.name))).name)
            method, family = _method(producer)
            cost = _cost(producer) if producer else None
            if model.get("fuse"):  # fused at generation (eval/fusion.py): nothing made; named after its members
                method, family, producer, cost = f"fuse {model['fuse']}", "fusion", record, dict(FUSED_COST)
                name = label or f"{model['fuse']}({'+'.join(Path(str(m['folder'])).name for m in model['members'])})"
            footprint = dict(record.get("metrics", {}).get("footprint") or {})
            rows.append(
                Row(
                    name,
                    method,
                    family,
                    model.get("folder"),
                    task_scores(record.get("metrics")),
                    footprint,
                    cost,
                    producer,
                    [str(folder)] + ([str(made[0])] if made else []),
                    _curve(made[0]) if made else [],
                )
            )
        elif folder.resolve() not in covered:
            method, family = _method(record)
            footprint = {"params_total": record.get("params_total"), "size_bytes": record.get("size_bytes")}
            rows.append(
                Row(
                    label or folder.name,
                    method,
                    family,
                    str(folder),
                    task_scores(record.get("metrics")),
                    footprint,
                    _cost(record),
                    record,
                    [str(folder)],
                    _curve(folder),
                )
            )
    seen: dict[str, int] = {}
    for row in rows:  # labels must be unique to name a baseline
        seen[row.label] = seen.get(row.label, 0) + 1
        if seen[row.label] > 1:
            row.label = f"{row.label}#{seen[row.label]}"
    return rows


def compare(
    runs: list[str],
    baseline: str | None = None,
    out: str | Path | None = None,
    title: str = "lmforge comparison",
    overwrite: bool = False,
) -> Comparison:
    """Compare run folders; with `out`, also write report.md, report.html, plots/ and comparison.json.

    Args:
        runs: run folders, each optionally `label=path`.
        baseline: label of the row deltas are taken against (default: the first row).
        out: report folder (refused if it exists, unless `overwrite`).
    """
    meter = RunMeter()
    rows = load_rows(runs)
    labels = [row.label for row in rows]
    base_label = baseline or labels[0]
    if base_label not in labels:
        raise UserError(f"--baseline '{baseline}' is not a row: use one of {', '.join(labels)}")
    base = rows[labels.index(base_label)]
    if base.family == "model":
        base.family, base.method = "base", "as is"
    tasks = list(dict.fromkeys(task for row in rows for task in row.scores))
    verdicts, method_rows = method_details(rows, base, tasks)
    tables = [
        scores_table(rows, base, tasks),
        footprint_table(rows),
        method_summary(rows, base, tasks, verdicts),
        TableData(
            "method comparison, model by model",
            [
                "model",
                "method",
                "score gained per task",
                "cost to make",
                "size",
                "retention of other skills",
                "verdict",
            ],  # fmt: skip
            method_rows,
            "Gains are against the baseline; wall times of fine-tuning, distillation and editing include the "
            "before/after scoring those commands do themselves.",
        ),
    ]
    comparison = Comparison(title, rows, base_label, tasks, tables, verdicts)
    if out is not None:
        _write_report(comparison, Path(out), overwrite, meter, runs)
    return comparison


def _delta(row: Row, base: Row, task: str) -> float | None:
    mine, theirs = row.scores.get(task), base.scores.get(task)
    if not mine or not theirs or mine["metric"] != theirs["metric"]:
        return None
    return mine["value"] - theirs["value"]


def _noise(row: Row, base: Row, task: str) -> float:
    """Two combined standard errors: a smaller delta is not told apart from chance."""
    errors = [r.scores.get(task, {}).get("stderr") or 0.0 for r in (row, base)]
    return 2 * math.sqrt(sum(e * e for e in errors))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(row: Row, base: Row, task: str) -> str:
    score = row.scores.get(task)
    if not score:
        return "-"
    delta = _delta(row, base, task)
    digits = 2 if score["metric"] in LOWER_IS_BETTER else 3
    text = _fmt(score["value"], digits)
    if row is not base and delta is not None:
        text += f" ({delta:+.{digits}f})"
    return text


def scores_table(rows: list[Row], base: Row, tasks: list[str]) -> TableData:
    """Score per task per model, with the delta against the baseline."""
    metrics = {task: next(r.scores[task]["metric"] for r in rows if task in r.scores) for task in tasks}
    columns = ["model", "made by"] + [f"{task} {metrics[task]}" for task in tasks]
    body = [[row.label, row.method] + [_cell(row, base, task) for task in tasks] for row in rows]
    lower = [t for t in tasks if metrics[t] in LOWER_IS_BETTER]
    note = f"deltas against {base.label}"
    if lower:
        note += f"; lower is better for {', '.join(lower)}"
    return TableData("score per task", columns, body, note)


def _moe_metrics(row: Row) -> dict:
    """A mixture of experts' own metrics (lmforge moe's run.json): active parameters, routing accuracy."""
    return ((row.producer or {}).get("metrics") or {}).get("moe") or {}


def _mb(value) -> str:
    return "-" if value is None else f"{value / MIB:,.0f} MiB"


def _params(count) -> str:
    """Parameters in M, or in K under 0.1 M (a tiny model is '20.6 K', not '0.0 M')."""
    if count is None:
        return "-"
    return f"{count / 1e3:.1f} K" if count < 1e5 else f"{count / 1e6:.1f} M"


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def footprint_table(rows: list[Row]) -> TableData:
    """What each model is (size, speed, memory when scored) and what it cost to make."""
    columns = ["model", "params", "size", "ms/token", "eval peak RSS", "wall to make", "CPU to make",
               "peak RSS to make", "tokens"]  # fmt: skip
    body = []
    for row in rows:
        fp, cost = row.footprint, row.cost or {}
        params = fp.get("params_total")
        # a mixture of experts uses only part per token; a fused model (footprint) runs every member
        active = _moe_metrics(row).get("params_active") or fp.get("params_active")
        body.append(
            [
                row.label,
                _params(params) + ("" if active is None else f" ({_params(active)} active)"),
                _mb(fp.get("size_bytes")),
                _fmt(fp.get("ms_per_token"), 1),
                _mb(fp.get("peak_rss_bytes")),
                _seconds(cost.get("wall_s")),
                _seconds(cost.get("cpu_s")),
                _mb(cost.get("peak_rss_bytes")),
                "-" if cost.get("tokens_seen") is None else f"{cost['tokens_seen']:,}",
            ]
        )
    return TableData("footprint and cost to make", columns, body, "'-': not measured, or not made by these runs")


def _folder_key(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _input_folders(value) -> list[str]:
    """Existing folders named anywhere in a run record's `inputs` (or part of it)."""
    found = []
    if isinstance(value, str) and Path(value).is_dir():
        found.append(_folder_key(value))
    elif isinstance(value, dict):
        for item in value.values():
            found += _input_folders(item)
    elif isinstance(value, list):
        for item in value:
            found += _input_folders(item)
    return list(dict.fromkeys(found))


def _targets(row: Row, tasks: list[str]) -> list[str]:
    """The tasks a made model was trained for (its data task); merges aim at their experts' tasks."""
    data = (row.producer or {}).get("data") or {}
    task = data.get("task") if isinstance(data, dict) else None
    return [task] if task in tasks else []


def _probe_change(row: Row, base: Row) -> float | None:
    mine, theirs = row.scores.get("probe"), base.scores.get("probe")
    if not mine or not theirs or mine["metric"] not in LOWER_IS_BETTER or not theirs["value"]:
        return None
    return mine["value"] / theirs["value"] - 1


def method_details(rows: list[Row], base: Row, tasks: list[str]) -> tuple[dict[str, str], list[list[str]]]:
    """Verdict per made model, and the model-by-model method table."""
    by_folder = {_folder_key(r.folder): r for r in rows if r.folder}
    experts = {}  # task -> best fine-tuned model on it
    for row in rows:
        if row.family == "fine-tuning":
            for task in _targets(row, tasks):
                if task not in experts or (_delta(row, base, task) or 0) > (_delta(experts[task], base, task) or 0):
                    experts[task] = row
    verdicts, body = {}, []
    scored = [t for t in tasks if t != "probe"]
    for row in rows:
        if row is base or row.family not in (*FAMILIES.values(), "fusion"):
            continue
        inputs = [by_folder[f] for f in _input_folders((row.producer or {}).get("inputs")) if f in by_folder]
        gains = [f"{t} {_signed(_delta(row, base, t))}" for t in scored]
        kept = []
        if row.family == "fine-tuning":
            verdict = _finetune_verdict(row, base, _targets(row, tasks))
        elif row.family in ("merge", "fusion"):  # both are judged by the share of each expert's gain they keep
            mine = [experts[t] for t in scored if t in experts]
            verdict, kept = _merge_verdict(row, base, [e for e in mine if e in inputs] or mine)
            routed = _moe_metrics(row).get("routing_accuracy", {}).get("by_task") or {}
            if routed:
                kept.append("routing accuracy " + ", ".join(f"{t} {share:.0%}" for t, share in routed.items()))
        elif row.family == "edit":
            verdict = _edit_verdict(row)
        else:
            teacher = _teacher(row, by_folder)
            verdict, kept = _distill_verdict(row, teacher, scored)
        probe = _probe_change(row, base)
        if probe is not None:
            kept.append(f"probe perplexity {_change(probe)}")
            if probe > FORGETS and row.family == "edit":  # an edit removes one behaviour and keeps the rest
                margin = verdict.partition(": ")[2] or verdict
                verdict = f"did not pay off: probe perplexity rose {_change(probe)} (> {FORGETS:+.0%}) while {margin}"
            elif probe > FORGETS and "probe perplexity" not in verdict:  # general text got worse: say so once
                verdict += f", but probe perplexity rose {_change(probe)} (forgetting)"
        verdicts[row.label] = verdict
        cost = row.cost or {}
        body.append(
            [
                row.label,
                row.method,
                ", ".join(gains) or "-",
                f"{_seconds(cost.get('wall_s'))}, {_mb(cost.get('peak_rss_bytes'))}",
                _mb(row.footprint.get("size_bytes")),
                "; ".join(kept) or "-",
                verdict,
            ]
        )
    return verdicts, body


def _change(share: float) -> str:
    """A relative change: +3.9%, or x1,025 once it is more than double."""
    return f"{share:+.1%}" if share < 1 else f"x{1 + share:,.0f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _finetune_verdict(row: Row, base: Row, targets: list[str]) -> str:
    if not targets:
        return "no target task recorded: see the scores"
    task = targets[0]
    delta, noise = _delta(row, base, task), _noise(row, base, task)
    if delta is None:
        return f"not scored on its task {task}"
    if delta > noise and delta > 0:
        return f"paid off: {task} {delta:+.3f}"
    return f"did not pay off: {task} {delta:+.3f} is within noise (+-{noise:.3f})"


def _merge_verdict(row: Row, base: Row, experts: list[Row]) -> tuple[str, list[str]]:
    shares = []
    for expert in dict.fromkeys(experts):
        for task in _targets(expert, list(expert.scores)):
            gain, mine = _delta(expert, base, task), _delta(row, base, task)
            if gain and gain > 0 and mine is not None:
                shares.append((task, expert.label, mine / gain))
    if not shares:
        return "no expert among the runs to measure against", []
    kept = [f"keeps {share:.0%} of {label}'s {task} gain" for task, label, share in shares]
    worst = min(shares, key=lambda s: s[2])
    if worst[2] >= KEEPS:
        return f"paid off: one model keeps >= {KEEPS:.0%} of every expert's gain", kept
    return f"did not pay off: keeps only {worst[2]:.0%} of {worst[1]}'s {worst[0]} gain", kept


def _edit_verdict(row: Row) -> str:
    """An edit aims at its pairs: the log-likelihood margin it recorded on them must fall."""
    margin = (row.producer or {}).get("preference") or {}
    before, after = margin.get("margin_before"), margin.get("margin_after")
    if before is None or after is None:
        return "no preference margin recorded: see the scores"
    change = f"log p(rejected) - log p(chosen) on {margin.get('pairs')} of its pairs {before:+.2f} -> {after:+.2f}"
    return f"paid off: {change}" if after < before else f"did not pay off: {change}"


def _teacher(row: Row, by_folder: dict[str, Row]) -> Row | None:
    inputs = (row.producer or {}).get("inputs") or {}
    for folder in _input_folders(inputs.get("teacher") if isinstance(inputs, dict) else None):
        if folder in by_folder:
            return by_folder[folder]
    return None


def _distill_verdict(row: Row, teacher: Row | None, tasks: list[str]) -> tuple[str, list[str]]:
    if teacher is None:
        return "teacher not among the runs: cannot measure retention", []
    shares = [
        (task, row.scores[task]["value"] / teacher.scores[task]["value"])
        for task in tasks
        if task in row.scores and task in teacher.scores and teacher.scores[task]["value"] > 0
    ]
    kept = [f"{share:.0%} of {teacher.label}'s {task}" for task, share in shares]
    size = _ratio(row.footprint.get("params_total"), teacher.footprint.get("params_total"))
    speed = _ratio(teacher.footprint.get("ms_per_token"), row.footprint.get("ms_per_token"))
    shape = f"{_fmt(size, 2)}x the teacher's parameters, {_fmt(speed, 2)}x its generation speed"
    kept.append(shape)
    probe = _ratio((row.scores.get("probe") or {}).get("value"), (teacher.scores.get("probe") or {}).get("value"))
    if probe is not None:
        kept.append(f"probe perplexity {probe:,.2f}x the teacher's")
    if not shares:
        return "teacher scores nothing the student is scored on", kept
    worst = min(shares, key=lambda s: s[1])
    general_kept = probe is None or probe <= GENERAL
    if worst[1] >= RETAINS and (speed or 0) >= FASTER and general_kept:
        return f"paid off: keeps >= {RETAINS:.0%} of the teacher's score at {shape}", kept
    if worst[1] < RETAINS:
        return f"did not pay off: keeps only {worst[1]:.0%} of the teacher's {worst[0]}", kept
    if not general_kept:
        return f"did not pay off: probe perplexity {probe:,.1f}x the teacher's (> {GENERAL:g}x)", kept
    return f"did not pay off: not faster enough ({_fmt(speed, 2)}x < {FASTER}x)", kept


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def method_summary(rows: list[Row], base: Row, tasks: list[str], verdicts: dict[str, str]) -> TableData:
    """The source document's table (criterion x method), filled with this run's measured numbers."""
    families = ["fine-tuning", "distillation", "merge", "edit"]
    groups = {f: [r for r in rows if r.family == f and r is not base] for f in families}
    scored = [t for t in tasks if t != "probe"]

    def cells(fn) -> list[str]:
        return [fn(groups[f]) if groups[f] else "not run" for f in families]

    def best_gain(group: list[Row]) -> str:
        parts = []
        for task in scored:
            best = max(group, key=lambda r: _delta(r, base, task) if _delta(r, base, task) is not None else -1e9)
            parts.append(f"{task} {_signed(_delta(best, base, task))} ({best.label})")
        return "; ".join(parts)

    def span(values: list, fmt) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        return fmt(values[0]) if len(set(values)) == 1 else f"{fmt(min(values))} - {fmt(max(values))}"

    def range_of(group: list[Row], key: str, fmt) -> str:
        return span([(r.cost or {}).get(key) for r in group], fmt)

    def size(group: list[Row]) -> str:
        return span([r.footprint.get("size_bytes") for r in group], _mb)

    def retention(group: list[Row]) -> str:
        changes = span([_probe_change(r, base) for r in group], _change)
        return "-" if changes == "-" else f"probe perplexity {changes}"

    def paid(group: list[Row]) -> str:
        good = [r.label for r in group if verdicts.get(r.label, "").startswith("paid off")]
        return f"{len(good)} of {len(group)} paid off" + (f" ({', '.join(good)})" if good else "")

    needs = [
        "task data + the base model",
        "a teacher + task prompts",
        "two or more fine-tuned models, no data",
        "preference pairs + the base model, no training",
    ]
    body = [
        ["effectiveness: best score gained per task", *cells(best_gain)],
        ["compute cost: wall time to make", *cells(lambda g: range_of(g, "wall_s", _seconds))],
        ["compute cost: peak memory to make", *cells(lambda g: range_of(g, "peak_rss_bytes", _mb))],
        ["result: size", *cells(size)],
        ["result: retention of other skills", *cells(retention)],
        ["what it needs", *needs],
        ["did it pay off here?", *cells(paid)],
    ]
    return TableData(
        "fine-tuning vs distillation vs merge vs edit (measured in this run)",
        ["criterion", *families],
        body,
        f"verdict thresholds: a gain beyond 2 standard errors; a merge keeps >= {KEEPS:.0%} of each expert's gain; "
        f"a student keeps >= {RETAINS:.0%} of its teacher's score, is >= {FASTER}x faster and its probe perplexity "
        f"is <= {GENERAL:g}x the teacher's; an edit lowers its pairs' margin and raises probe perplexity by at most "
        f"{FORGETS:.0%}",
    )


def to_rich(table: TableData) -> Table:
    out = Table(title=table.title, caption=table.note or None)
    for column in table.columns:
        out.add_column(column)
    for row in table.rows:
        out.add_row(*row)
    return out


def print_comparison(comparison: Comparison, console: Console | None = None) -> None:
    """The tables on the terminal; the model-by-model method table, too wide for one, as its verdicts."""
    console = table_console(console)
    for table in comparison.tables[:-1]:
        console.print(to_rich(table))
    for label, verdict in comparison.verdicts.items():
        colour = "green" if verdict.startswith("paid off") else "red" if verdict.startswith("did not") else "default"
        console.print(f"{label}: [{colour}]{verdict}[/{colour}]", highlight=False)


def to_markdown(table: TableData) -> str:
    def clean(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [f"### {table.title}", "", "| " + " | ".join(map(clean, table.columns)) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(map(clean, row)) + " |" for row in table.rows]
    return "\n".join(lines + (["", f"_{table.note}_"] if table.note else []))


def _write_report(comparison: Comparison, out: Path, overwrite: bool, meter: RunMeter, runs: list[str]) -> None:
    images = plots.render_all(comparison)
    with staged_output(out, overwrite=overwrite) as staging:
        (staging / "plots").mkdir()
        for name, png in images.items():
            (staging / "plots" / f"{name}.png").write_bytes(png)
        parts = [f"# {comparison.title}", "", f"Baseline: **{comparison.baseline}**. Runs: {len(runs)} folders."]
        parts += ["", *(to_markdown(t) + "\n" for t in comparison.tables)]
        parts += [f"![{name}](plots/{name}.png)\n" for name in images]
        (staging / "report.md").write_text("\n".join(parts), encoding="utf-8")
        (staging / "report.html").write_text(html.render(comparison, images), encoding="utf-8")
        numbers = {
            "baseline": comparison.baseline,
            "tasks": comparison.tasks,
            "rows": [row.__dict__ for row in comparison.rows],
            "verdicts": comparison.verdicts,
        }
        write_json(staging / "comparison.json", numbers)
        write_json(staging / "run.json", run_record("compare", "compare", meter, inputs={"runs": runs}))
