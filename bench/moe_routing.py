"""Router rows of `lmforge moe` on real experts: mergekit's `hidden` against lmforge's `hidden_mlp` and `ridge`.

For each gate mode, the same two experts (default: the demo's, from a finished demo or recipe folder) are built
into a Mixtral MoE (one expert per token, attention from the base) with the same prompts (train-split records
1000+ of each task, never scored), and the script records routing accuracy (the share of each task's test
tokens whose top-1 expert is that task's expert, over every layer; lmforge/merge/moe_eval.py), the layers
whose router matrix is ill-conditioned, the build time and, with --eval-limit, the task scores
(exact match on the first N test records). One JSON line per mode is printed and written to --out.

    python bench/moe_routing.py --recipe-dir /tmp/h5/demo_moe --modes hidden hidden_mlp ridge --eval-limit 30
    python bench/moe_routing.py --recipe-dir runs/demo --modes hidden --train-router 50 --eval-limit 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.eval.tasks import TASKS
from lmforge.merge.moe import moe

TASK_NAMES = ("dates", "extraction")


def prompts(task: str, count: int) -> list[str]:
    """Train-split prompts the experts did not train on (they used the first 400) and no test scores."""
    return [doc["prompt"] for doc in list(TASKS[task].shots())[1000 : 1000 + count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe-dir", type=Path, help="folder holding expert_dates/ and expert_extraction/")
    parser.add_argument("--experts", nargs=2, type=Path, help="or the two expert folders (dates, extraction)")
    parser.add_argument("--base", default="default")
    parser.add_argument("--modes", nargs="+", default=["hidden", "hidden_mlp", "ridge"])
    parser.add_argument("--prompts", type=int, default=4, help="positive prompts per expert")
    parser.add_argument("--per-token", type=int, default=1, help="experts_per_token")
    parser.add_argument("--routing-limit", type=int, default=30)
    parser.add_argument("--train-router", type=int, default=0, help="router-only training steps after the build")
    parser.add_argument("--eval-limit", type=int, default=0, help="also score N test records per task (0: no)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/moe_routing.jsonl"))
    args = parser.parse_args()
    experts = args.experts or [args.recipe_dir / f"expert_{task}" for task in TASK_NAMES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for mode in args.modes:
        config = {
            "base_model": args.base,
            "gate_mode": mode,
            "experts_per_token": args.per_token,
            "experts": [
                {"source_model": str(folder), "positive_prompts": prompts(task, args.prompts)}
                for folder, task in zip(experts, TASK_NAMES, strict=True)
            ],
            "routing_tasks": list(TASK_NAMES),
            "routing_limit": args.routing_limit,
        }
        if args.train_router:
            config["train_router"] = {"steps": args.train_router}
        with tempfile.TemporaryDirectory(prefix="moe_routing_") as scratch:
            start = time.perf_counter()
            folder = moe(config, Path(scratch) / mode)
            built = time.perf_counter() - start
            record = json.loads((folder / "run.json").read_text())
            row = {
                "mode": mode,
                "experts_per_token": args.per_token,
                "routing_accuracy": record["metrics"]["moe"]["routing_accuracy"]["by_task"],
                "degenerate_layers": record["router"]["degenerate_layers"],
                "build_s": round(built, 1),
            }
            if args.train_router:
                training = record["router"]["training"]
                row["train_router_steps"] = args.train_router
                row["routing_accuracy_before_training"] = training["routing_accuracy_before"]["by_task"]
            if args.eval_limit:
                from lmforge.eval.run import evaluate, metrics_of

                results = evaluate(str(folder), list(TASK_NAMES), limit=args.eval_limit, footprint=False)
                row["exact_match"] = {t: m["exact_match"]["value"] for t, m in metrics_of(results).items()}
        print(json.dumps(row), flush=True)
        with args.out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
