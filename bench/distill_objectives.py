"""Distillation objectives compared at one step budget: the same teacher, student rule, data, steps and lr; only
the objective changes (issue 5: forward KL vs reverse KL vs JSD vs skew KL).

Each objective runs `configs/distill_extraction.yaml` with `objectives=[{loss: NAME}]`, `train.max_steps=STEPS`
and `eval.limit=LIMIT`; the student is scored on LIMIT test records of `extraction` (exact match), and on a
common yardstick, completion CE and KL(teacher || student) per token on 40 held-out validation rows. The
teacher's own score cannot change between runs, so it is computed once and reused.

    # teacher first (README "Distill"): lmforge finetune --task extraction --steps 12 --merge --out /tmp/teacher
    .venv/bin/python bench/distill_objectives.py --teacher /tmp/teacher --steps 40 --limit 200
    .venv/bin/python bench/distill_objectives.py --teacher /tmp/teacher --only skew_rkl tv   # adds to the JSON

Figures go to bench/results/distill_objectives.json (objectives already there are kept unless rerun).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "forward_kl": "[{loss: forward_kl}]",
    "reverse_kl": "[{loss: reverse_kl}]",
    "jsd": "[{loss: jsd, beta: 0.5}]",
    "skew_kl": "[{loss: skew_kl, alpha: 0.1}]",
    "skew_rkl": "[{loss: skew_rkl, alpha: 0.1}]",
    "tv": "[{loss: tv}]",
}
DEFAULT = ("forward_kl", "reverse_kl", "jsd", "skew_kl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher model folder (a fine-tuned SmolLM2-135M)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--limit", type=int, default=200, help="test records scored per model")
    parser.add_argument("--only", nargs="+", choices=list(OBJECTIVES), default=list(DEFAULT))
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill_objectives"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "distill_objectives.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="lmforge: %(message)s", stream=sys.stderr)

    from lmforge import config as config_io
    from lmforge.distill import run as distill_run

    teacher_scores: dict = {}
    evaluate = distill_run.evaluate

    def evaluate_teacher_once(loaded, tasks, **kwargs):
        if str(loaded.folder) != str(Path(args.teacher)):
            return evaluate(loaded, tasks, **kwargs)
        key = (tuple(tasks), kwargs.get("limit"))
        if key not in teacher_scores:
            teacher_scores[key] = evaluate(loaded, tasks, **kwargs)
        return teacher_scores[key]

    distill_run.evaluate = evaluate_teacher_once
    results = json.loads(args.output.read_text()).get("objectives", {}) if args.output.is_file() else {}
    for name in args.only:
        cfg = config_io.load(
            ROOT / "configs" / "distill_extraction.yaml",
            distill_run.DistillConfig,
            [
                f"teacher={args.teacher}",
                f"output={args.work / name}",
                "overwrite=true",
                f"objectives={OBJECTIVES[name]}",
                f"train.max_steps={args.steps}",
                "train.warmup_steps=5",
                "train.eval_every=0",
                f"eval.limit={args.limit}",
            ],
        )
        start, cpu = time.perf_counter(), time.process_time()
        out = distill_run.run_distill(cfg)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        results[name] = {**measure(cfg, out, args.teacher), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        results[name]["load_after"] = os.getloadavg()[0]
        print(name, json.dumps(results[name]), flush=True)
        report = {"benchmark": "distill_objectives", "steps": args.steps, "limit": args.limit, "objectives": results}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    print_table(results)
    return 0


def measure(cfg, out: Path, teacher_folder: str) -> dict:
    """Exact match from the run record, and the held-out yardstick (CE, KL to the teacher) on 40 rows."""
    from lmforge.data.sources import split_records
    from lmforge.distill import signals
    from lmforge.distill import student as students
    from lmforge.finetune.sft import load_records_for, tokenize
    from lmforge.models.load import load_model

    record = json.loads((out / "run.json").read_text())
    teacher, student = load_model(teacher_folder), load_model(out)
    _, val = split_records(load_records_for(cfg), cfg.data.val_fraction, cfg.train.seed)
    rows = tokenize(val[:40], teacher.tokenizer, cfg.data)
    collate = signals.batch_collate(teacher.tokenizer.pad_token_id)
    vocab = students.shared_vocab(teacher.model, student.model)
    checks = [students.quality(student.model, teacher.model, collate(rows[i : i + 8]), vocab) for i in range(0, 40, 8)]
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    return {
        "exact_match": record["metrics"]["extraction"]["exact_match"]["value"],
        "teacher_exact_match": record["teacher_metrics"]["extraction"]["exact_match"]["value"],
        "heldout_ce": sum(c["ce"] for c in checks) / len(checks),
        "heldout_kl": sum(c["kl"] for c in checks) / len(checks),
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "train_s": steps[-1]["elapsed_s"],
    }


def print_table(results: dict) -> None:
    print(f"{'objective':<12} {'exact match':>11} {'held-out CE':>11} {'held-out KL':>11} {'loss first->last':>18}")
    for name, r in results.items():
        losses = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        print(f"{name:<12} {r['exact_match']:>11.3f} {r['heldout_ce']:>11.3f} {r['heldout_kl']:>11.3f} {losses:>18}")


if __name__ == "__main__":
    raise SystemExit(main())
