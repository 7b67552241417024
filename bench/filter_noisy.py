"""Noisy answers: does filtering the training set before LoRA SFT pay off? (issue 17, item 3)

A seeded share of a built-in task's train records get another record's answer (`lmforge data export --noise`,
data/answers.py `corrupt`: right format, wrong value). Then LoRA SFT (`lmforge finetune`, the same settings
each time) trains at equal steps on:
- full: every noisy record;
- verified: `lmforge data filter --verify TASK` (exact answers recomputed from the prompt);
- model_nll_30: no answer key, only the scoring model: the 30% of records whose answer it finds most likely
  given the prompt (mean NLL per answer token); the same pass tells how many wrong answers the paper's
  IFD <= 1 rule alone would catch (not trained on).
Each adapter is scored on the task's test split (exact match); the base model once. Acceptance: a filtered
set reaches the full set's score with at most 30% of the records, or scores higher at equal steps.

    /work/notes/heavy timeout 3600 .venv/bin/python bench/filter_noisy.py --records 400 --steps 30 --test-limit 100

Figures go to bench/results/filter_noisy.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="dates")
    parser.add_argument("--records", type=int, default=400, help="train records drawn (then corrupted)")
    parser.add_argument("--noise", type=float, default=0.3, help="share of records given a wrong answer")
    parser.add_argument("--steps", type=int, default=30, help="LoRA SFT steps of 8 records, the same for every set")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--test-limit", type=int, default=100, help="test records scored per model")
    parser.add_argument("--only", nargs="+", default=None, help="run only these sets (full, verified, ...)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/filter_noisy"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "filter_noisy.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.INFO, format="lmforge: %(message)s", stream=sys.stderr)

    from lmforge import evaluate, finetune
    from lmforge.data import synthetic
    from lmforge.data.answers import corrupt
    from lmforge.data.filter import filter_data
    from lmforge.models.load import load_model

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    clean = synthetic.examples(args.task, "train", args.records)
    noisy, wrong = corrupt(clean, args.noise, seed=0)
    noisy_file = work / "noisy.jsonl"
    noisy_file.write_text("".join(json.dumps(r) + "\n" for r in noisy), encoding="utf-8")

    def kept_indices(result) -> list[int]:
        dropped = {json.loads(line)["index"] for line in (result.output / "dropped.jsonl").read_text().splitlines()}
        return [i for i in range(args.records) if i not in dropped]

    sets: dict[str, dict] = {"full": {"file": noisy_file, "indices": list(range(args.records)), "filter_s": 0.0}}
    common = {"data": str(noisy_file), "model": args.model, "max_length": 128}
    verified = filter_data(output=str(work / "verified"), verify=args.task, ifd_max=None, **common)
    sets["verified"] = {"file": verified.output / "kept.jsonl", "indices": kept_indices(verified)}
    sets["verified"]["filter_s"] = verified.seconds
    # One scoring pass: the 30% of records whose answer the model finds most likely; scores.jsonl also gives
    # every record's IFD, so the paper's IFD <= 1 rule is judged on the same pass without a second one.
    by_model = filter_data(output=str(work / "model_nll_30"), ifd_max=None, keep_fraction=0.3, keep_by="nll_low",
                           **common)  # fmt: skip
    sets["model_nll_30"] = {"file": by_model.output / "kept.jsonl", "indices": kept_indices(by_model)}
    sets["model_nll_30"]["filter_s"] = by_model.seconds
    scores = [json.loads(line) for line in (by_model.output / "scores.jsonl").read_text().splitlines()]
    ifd_rule = [row["index"] for row in scores if row["ifd"] <= 1.0]
    sets["ifd_rule_only"] = {"file": None, "indices": ifd_rule, "train": False, "filter_s": by_model.seconds}
    mean = {
        name: {
            key: sum(row[key] for row in scores if (row["index"] in wrong) == is_wrong) / max(1, count)
            for key in ("nll", "ifd")
        }
        for name, is_wrong, count in (("right", False, args.records - len(wrong)), ("wrong", True, len(wrong)))
    }
    print("mean scores of right and wrong answers:", mean, file=sys.stderr, flush=True)

    def exact_match(model) -> float:
        results = evaluate(load_model(str(model)), [args.task], limit=args.test_limit, footprint=False)
        return results["results"][args.task]["exact_match,none"]

    rows = {"base": {"records": 0, "exact_match": exact_match(args.model)}}
    for name, item in sets.items():
        indices = item["indices"]
        row = {
            "records": len(indices),
            "share_of_records": len(indices) / args.records,
            "wrong_answers_kept": sum(i in wrong for i in indices),
            "wrong_answers_caught": len(wrong) - sum(i in wrong for i in indices),
            "filter_s": round(item["filter_s"], 1),
        }
        if item.get("train", True) and (args.only is None or name in args.only):
            begin = time.perf_counter()
            folder = finetune(
                {
                    "output": str(work / f"sft_{name}"),
                    "model": args.model,
                    "data": {"path": str(item["file"]), "max_length": 128, "val_fraction": 0.0},
                    "train": {"lr": args.lr, "max_steps": args.steps, "batch_size": 8, "warmup_steps": 2},
                    "lora": {"r": 16, "alpha": 32},
                    "eval": {"probe": False},
                }
            )
            row["train_s"] = round(time.perf_counter() - begin, 1)
            row["exact_match"] = exact_match(folder)
        rows[name] = row
        print(name, row, file=sys.stderr, flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {"settings": settings, "wrong_answers": len(wrong), "mean_scores": mean, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"| set | records | wrong answers kept | exact match ({args.test_limit} test records) |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        score = f"{row['exact_match']:.3f}" if "exact_match" in row else "(not trained)"
        print(f"| {name} | {row['records']} | {row.get('wrong_answers_kept', '')} | {score} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
