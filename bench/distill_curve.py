"""Size vs quality of distilled students: width-pruned and depth-pruned at about 0.6x, 0.4x and 0.2x of the
teacher's parameters, at equal steps (issue 17, item 5).

Writes a recipe (OUT/curve.yaml) and runs it with the ordinary recipe runner, so an interrupted curve resumes
where it stopped when the same command runs again: a task-fine-tuned teacher (LoRA on TASK, merged; or
--teacher FOLDER), distillation data, then per size one width-pruned student (`width.params_fraction`) and
one depth-pruned student (`student_layers`: the layer count whose size is nearest the fraction; the measured
layer rule), all with the same objectives (forward KL + 0.5 CE), data, steps and learning rate; every model
scored on TASK (exact match), the probe (perplexity) and its footprint (ms per generated token); a comparison
report. Then a table and a PNG (retention and probe perplexity against parameters and ms per token) go to
bench/results/distill_curve.{json,png}.

    /work/notes/heavy timeout 7200 .venv/bin/python bench/distill_curve.py --out runs/distill-curve
    .venv/bin/python bench/distill_curve.py --out runs/distill-curve --sizes 0.6 --steps 40   # a smaller round

A depth-pruned student cannot be smaller than the embeddings plus one layer (SmolLM2-135M: 0.237x); such a
size gets the one-layer student and the table says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = [{"loss": "forward_kl", "weight": 1.0}, {"loss": "ce", "weight": 0.5}]
# as configs/distill_extraction.yaml: one teacher-written general row per task row (the samples cached once)
GENERAL = {"ratio": 1.0, "samples": 256, "max_new_tokens": 96, "max_length": 104}


def depth_layers(teacher_config, fraction: float) -> int:
    """The layer count whose depth-pruned size is nearest `fraction` of the teacher's parameters."""
    from lmforge.distill.prune import param_count

    total = param_count(teacher_config)
    layers = range(1, teacher_config.num_hidden_layers)
    return min(layers, key=lambda n: abs(param_count(teacher_config, n) / total - fraction))


def curve_recipe(args, teacher_config) -> dict:
    """The recipe: teacher, data, one width and one depth student per size, evaluations, report."""
    steps: list[dict] = []
    if args.teacher:
        teacher = str(Path(args.teacher).absolute())
    else:
        teacher = "${steps.teacher.output}"
        steps.append(
            {
                "name": "teacher",
                "kind": "finetune",
                "config": {
                    "model": args.model,
                    "merge": True,
                    "data": {"task": args.task, "limit": 400, "max_length": 128},
                    "train": {"lr": 5e-4, "max_steps": 24, "batch_size": 8, "warmup_steps": 2, "eval_every": 12},
                    "lora": {"r": 16, "alpha": 32},
                    "eval": {"limit": 10, "probe": False},
                },
            }
        )
    steps.append({"name": "distill_data", "kind": "data", "config": {"tasks": [args.task], "start": 400, "count": 800}})
    distill = {
        "teacher": teacher,
        "data": {"path": "${steps.distill_data.output}/train.jsonl", "max_length": 128},
        "objectives": OBJECTIVES,
        "general": GENERAL,
        "train": {"lr": args.lr, "max_steps": args.steps, "batch_size": 8, "warmup_steps": 5, "eval_every": 1000},
        "eval": {"task": args.task, "limit": 10, "probe": False},
    }
    scored = {"tasks": [args.task, "probe"], "limit": args.limit}
    steps.append({"name": "eval_teacher", "kind": "eval", "config": {"model": teacher, **scored}})
    labels = ["teacher=${steps.eval_teacher.output}"]
    for fraction in args.sizes:
        tag = f"{round(fraction * 100):02d}"
        shapes = {
            f"width_{tag}": {"width": {"params_fraction": fraction}},
            f"depth_{tag}": {"student_layers": depth_layers(teacher_config, fraction)},
        }
        for name, shape in shapes.items():
            steps.append({"name": name, "kind": "distill", "config": {**distill, **shape}})
            steps.append(
                {"name": f"eval_{name}", "kind": "eval", "config": {"model": f"${{steps.{name}.output}}", **scored}}
            )
            labels.append(f"{name}=${{steps.eval_{name}.output}}")
    report = {"title": f"size vs quality: students of a {args.task} teacher", "baseline": "teacher", "runs": labels}
    steps.append({"name": "report", "kind": "compare", "config": report})
    description = f"width vs depth students at {', '.join(map(str, args.sizes))}x, {args.steps} steps each"
    return {"description": description, "output": str(Path(args.out).absolute()), "steps": steps}


def summarise(root: Path, args) -> list[dict]:
    """One row per model: parameters, task score and retention, probe perplexity, ms per token, minutes to make."""
    from lmforge.report.compare import load_rows

    state = json.loads((root / "recipe-state.json").read_text())["steps"]
    specs = [f"{name.removeprefix('eval_')}={root / name}" for name in state if name.startswith("eval_")]
    rows = load_rows(specs)
    teacher = next(row for row in rows if row.label == "teacher")
    teacher_params = teacher.footprint["params_total"]
    teacher_score = teacher.scores[args.task]["value"]
    table = []
    for row in rows:
        making = state.get(row.label, {})
        record = {
            "model": row.label,
            "params": row.footprint["params_total"],
            "params_ratio": row.footprint["params_total"] / teacher_params,
            "exact_match": row.scores[args.task]["value"],
            "retention": row.scores[args.task]["value"] / teacher_score if teacher_score else None,
            "probe_ppl": row.scores["probe"]["value"],
            "ms_per_token": row.footprint.get("ms_per_token"),
            "minutes_to_make": round(making["wall_s"] / 60, 1) if row.label != "teacher" and making else None,
        }
        if row.label != "teacher" and row.producer:
            config = row.producer.get("config", {})
            record["student_layers"] = config.get("student_layers")
            record["width"] = config.get("width")
        table.append(record)
    return table


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, x_key, x_label in ((0, "params", "parameters (M)"), (1, "ms_per_token", "ms per generated token")):
        for row_index, (y_key, y_label) in enumerate((("retention", "task retention"), ("probe_ppl", "probe ppl"))):
            axis = axes[row_index][column]
            for kind, marker in (("width", "o"), ("depth", "s"), ("teacher", "*")):
                points = [r for r in table if r["model"].startswith(kind) and None not in (r.get(x_key), r.get(y_key))]
                scale = 1e6 if x_key == "params" else 1
                xs = [r[x_key] / scale for r in points]
                axis.plot(xs, [r[y_key] for r in points], marker=marker, linestyle="", label=kind, markersize=8)
                for r, x in zip(points, xs, strict=True):
                    axis.annotate(r["model"], (x, r[y_key]), fontsize=7)
            axis.set_xlabel(x_label)
            axis.set_ylabel(y_label)
            if y_key == "probe_ppl":
                axis.set_yscale("log")
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/distill-curve", help="recipe output folder (reruns resume)")
    parser.add_argument("--model", default="default", help="model the teacher is fine-tuned from")
    parser.add_argument("--teacher", default=None, help="an already task-fine-tuned teacher folder instead")
    parser.add_argument("--task", default="extraction")
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.6, 0.4, 0.2])
    parser.add_argument("--steps", type=int, default=80, help="distillation steps of 8 records, every student")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--limit", type=int, default=100, help="task test records and probe passages scored")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "distill_curve")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="lmforge: %(message)s", stream=sys.stderr)

    from transformers import AutoConfig

    from lmforge.models.load import resolve_model
    from lmforge.recipe.runner import run_recipe

    teacher_config = AutoConfig.from_pretrained(resolve_model(args.teacher or args.model))
    recipe = curve_recipe(args, teacher_config)
    root = Path(recipe["output"])
    root.mkdir(parents=True, exist_ok=True)
    (root / "curve.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    run_recipe(root / "curve.yaml")
    table = summarise(root, args)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.results.with_suffix(".json").write_text(json.dumps({"settings": settings, "rows": table}, indent=2) + "\n")
    plot(table, args.results.with_suffix(".png"))
    print("| model | params | exact match | retention | probe ppl | ms/token | minutes to make |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        retention = f"{r['retention']:.1%}" if r["retention"] is not None else "-"
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f} M ({r['params_ratio']:.3f}x) | {r['exact_match']:.3f} | "
            f"{retention} | {r['probe_ppl']:.2f} | {r['ms_per_token'] or 0:.1f} | {r['minutes_to_make'] or '-'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
