"""ProFS editing (`lmforge edit`) against DPO with LoRA (`lmforge dpo`) on the same preference pairs.

Pairs: lmforge's built-in insult/profanity task (lmforge/edit/toxicity.py); conditions: the first 50 pairs,
500 pairs, and each of those with a share of labels flipped (chosen and rejected swapped, seeded). Each run
is its own `lmforge` process, so run.json's wall time and peak RSS are that command's alone. Every model
(base included) is then scored here the same way: the share of flagged greedy continuations of the held-out
provocative prompts, the held-out log-likelihood margin, probe perplexity and a built-in task's exact match.
Results are written after every run, so an interrupted benchmark keeps what it measured.

    python bench/edit_vs_dpo.py                       # everything (slow on a shared CPU)
    python bench/edit_vs_dpo.py --conditions 500 500:0.3 --no-base   # DPO: one epoch (125 steps of 4 pairs)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.edit import toxicity
from lmforge.eval.run import evaluate, metrics_of
from lmforge.models.load import load_model

ROOT = Path(__file__).resolve().parent
LMFORGE = str(Path(sys.executable).with_name("lmforge"))


def write_condition(folder: Path, pairs: int, flip: float, seed: int = 1) -> Path:
    """The first `pairs` built-in pairs, a `flip` share of them with chosen and rejected swapped."""
    records = toxicity.preference_pairs(500, seed=0)[:pairs]
    for i in random.Random(seed).sample(range(pairs), round(flip * pairs)):
        records[i] = records[i] | {"chosen": records[i]["rejected"], "rejected": records[i]["chosen"]}
    path = folder / f"pairs-{pairs}-flip{flip:g}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def score(ref: str, args) -> dict:
    """The four measures of one model, with the seconds scoring took."""
    start = time.perf_counter()
    loaded = load_model(ref)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    prompts = random.Random(0).sample(toxicity.heldout_prompts(), args.prompts)  # every opening, every situation
    unwanted = toxicity.unwanted_rate(model, tokenizer, prompts, max_new_tokens=args.new_tokens)
    margin = toxicity.preference_margin(model, tokenizer, toxicity.heldout_pairs()[: args.margin_pairs])
    probe = metrics_of(evaluate(loaded, ["probe"], limit=args.probe_docs, footprint=False))["probe"]
    task = evaluate(loaded, [args.task], limit=args.task_limit, num_fewshot=args.shots, footprint=False)
    task = metrics_of(task)[args.task]
    return {
        "unwanted_rate": unwanted["rate"],
        "unwanted_flagged": unwanted["flagged"],
        "unwanted_n": unwanted["n"],
        "samples": unwanted["samples"][:4],
        "heldout_margin": margin,
        "probe_perplexity": probe["perplexity"]["value"],
        f"{args.task}_exact_match": task["exact_match"]["value"],
        "score_s": round(time.perf_counter() - start, 1),
    }


def run(command: list[str]) -> dict:
    """Run one lmforge command; its run.json's costs."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    out = Path(command[command.index("--out") + 1])
    record = json.loads((out / "run.json").read_text())
    return {"wall_s": record["wall_s"], "peak_rss_mib": round(record["peak_rss_bytes"] / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", nargs="+", default=["50", "50:0.3", "500", "500:0.3"], help="PAIRS[:FLIP]")
    parser.add_argument("--methods", nargs="+", default=["profs", "dpo"])
    parser.add_argument("--dpo-steps", type=int, default=None, help="DPO steps (default: one epoch)")
    parser.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step")
    parser.add_argument("--dpo-lr", type=float, default=5e-4)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--layers", default=None, help="ProFS layers, e.g. 24,25,26 (default: lmforge's)")
    parser.add_argument("--site", default=None, help="ProFS site: residual or mlp (default: lmforge's)")
    parser.add_argument("--no-base", action="store_true", help="do not score the base model")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts generated from (of 128)")
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--margin-pairs", type=int, default=8)
    parser.add_argument("--probe-docs", type=int, default=1)
    parser.add_argument("--task", default="dates")
    parser.add_argument("--task-limit", type=int, default=5)
    parser.add_argument("--shots", type=int, default=0, help="k-shot turns for the task (the base scores 0 at 0)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lmforge-edit-vs-dpo"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "edit_vs_dpo.json")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": []}
    if not args.no_base:
        results["base"] = score("default", args)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print("base", {k: v for k, v in results["base"].items() if k != "samples"}, flush=True)
    for condition in args.conditions:
        pairs, _, flip = condition.partition(":")
        data = write_condition(args.work, int(pairs), float(flip or 0))
        for method in args.methods:
            out = args.work / f"{method}-{data.stem}"
            if method == "profs":
                command = [LMFORGE, "edit", "--method", "profs", "--data", str(data), "--out", str(out)]
                command += ["--k", str(args.k), "eval.probe=false"] + (["--layers", args.layers] if args.layers else [])
                command += [f"site={args.site}"] if args.site else []
            else:
                steps = args.dpo_steps or math.ceil(int(pairs) / args.dpo_batch)  # one pass over the pairs
                command = [LMFORGE, "dpo", "--data", str(data), "--out", str(out), "--steps", str(steps)]
                command += ["--lr", str(args.dpo_lr), f"train.batch_size={args.dpo_batch}", "eval.probe=false"]
                command += ["train.save_every=1000"]
            row = {"method": method, "pairs": int(pairs), "flip": float(flip or 0), **run(command)}
            row |= score(str(out), args)
            results["runs"].append(row)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print({k: v for k, v in row.items() if k != "samples"}, flush=True)


if __name__ == "__main__":
    main()
