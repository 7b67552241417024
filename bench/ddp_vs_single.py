"""Two-process DDP vs one process vs the old hand-summed gradients, same global batch (issue 16).

Three runs of the same LoRA SFT (r=16, every linear layer, the default model unless `--model`, fp32 on the
CPU, the built-in `dates` task, `--batch` rows per optimiser step in total), measured one after the other in
this one invocation so their ratios share the machine's load:
- `single`: one process, today's loop (batch = the global batch);
- `ddp`: two processes through `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml` (gloo),
  today's loop: the LossModule under DistributedDataParallel (bucketed all-reduce inside backward);
- `hand_sum`: two processes, the same launch, the loop as it was before (commit `--old-commit`, read with
  `git show` into a temporary module): the model unwrapped and one all-reduce per trainable tensor after
  the backward passes.
Per run: training tokens/s (input tokens of steps 2..N over the loop's clock between the end of step 1 and
the last step, so start-up and the first step's warm-up are left out), the peak RSS of every process
(getrusage), and the loss curve (the three must agree: same global batch, same update).
Every process gets `--threads` OpenMP threads, so the 2-process runs use twice the cores of `single`.

    .venv/bin/python bench/ddp_vs_single.py                 # ~5 minutes on 2 cores, quiet machine
    .venv/bin/python bench/ddp_vs_single.py --model /path/to/tiny --steps 4   # a smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DDP_CPU = ROOT / "configs" / "accelerate" / "ddp_cpu.yaml"
OLD_COMMIT = "9b11b0c~1"  # the last loop with the hand-written gradient sum (train/loop.py:_sum_gradients)
MODES = ("single", "ddp", "hand_sum")


def child(args: argparse.Namespace) -> None:
    """One process of a run: train, then write its rank's figures to OUT/rank<r>.json."""
    import torch

    torch.set_num_threads(args.threads)
    from lmforge.data.packing import collate
    from lmforge.data.prepare import DataSettings, tokenize, training_records
    from lmforge.finetune.lora import LoraSettings, attach_lora
    from lmforge.models.load import load_model
    from lmforge.train.chunked import causal_lm_loss
    from lmforge.train.loop import TrainConfig

    if args.loop_file:  # the old loop, loaded from the file `git show` wrote
        spec = importlib.util.spec_from_file_location("old_loop", args.loop_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_loop"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        train, config_class = module.train, module.TrainConfig
    else:
        from lmforge.train.loop import train

        config_class = TrainConfig
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    loaded = load_model(args.model, device="cpu")
    data = DataSettings(task="dates", limit=args.records, max_length=128)
    rows = tokenize(training_records(data), loaded.tokenizer, data)
    torch.manual_seed(0)
    model = attach_lora(loaded.model, LoraSettings(r=16, alpha=32, dropout=0.0))
    cfg = config_class(
        lr=1e-4, max_steps=args.steps, batch_size=args.batch // world, schedule="constant", save_every=10**6
    )
    pad = loaded.tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as work:
        history = train(model, rows, causal_lm_loss, lambda b: collate(b, pad), cfg, Path(work) / f"work-{rank}")
    steps = [h for h in history if "loss" in h]
    timed = steps[1:]
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    figures = {
        "rank": rank,
        "losses": [h["loss"] for h in steps],
        "tokens_per_s": sum(h["input_tokens"] for h in timed) / seconds if seconds > 0 else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(figures))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run(mode: str, args: argparse.Namespace, folder: Path, old_loop: Path) -> dict:
    """Launch one mode; its per-rank figures and the load before it."""
    out = folder / mode
    out.mkdir(parents=True)
    script = [str(Path(__file__).resolve()), "--child", "--out", str(out), "--model", args.model]
    script += ["--steps", str(args.steps), "--batch", str(args.batch), "--records", str(args.records)]
    script += ["--threads", str(args.threads)] + (["--loop-file", str(old_loop)] if mode == "hand_sum" else [])
    if mode == "single":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU), *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES="")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{mode} failed:\n{result.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {
        "processes": len(ranks),
        "load_before": round(load, 2),
        "wall_s": round(time.perf_counter() - started, 1),
        "tokens_per_s": ranks[0]["tokens_per_s"],
        "peak_rss_mb_per_process": [round(r["peak_rss_mb"]) for r in ranks],
        "losses": ranks[0]["losses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps per run (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="global rows per optimiser step (default 8)")
    parser.add_argument("--records", type=int, default=200, help="dates records to draw rows from")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process (default 1)")
    parser.add_argument("--old-commit", default=OLD_COMMIT, help="the commit whose train/loop.py sums by hand")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "ddp_vs_single.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--loop-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        old_loop = folder / "old_loop.py"
        source = subprocess.run(
            ["git", "show", f"{args.old_commit}:lmforge/train/loop.py"], capture_output=True, text=True, cwd=ROOT
        )
        if source.returncode != 0 or "_sum_gradients" not in source.stdout:
            sys.exit(f"{args.old_commit}:lmforge/train/loop.py is not the hand-summed loop: {source.stderr.strip()}")
        old_loop.write_text(source.stdout)
        results = {mode: run(mode, args, folder, old_loop) for mode in MODES}
    single, ddp, hand = results["single"], results["ddp"], results["hand_sum"]
    ratios = {
        "ddp_vs_single_tokens_per_s": ddp["tokens_per_s"] / single["tokens_per_s"],
        "ddp_vs_hand_sum_tokens_per_s": ddp["tokens_per_s"] / hand["tokens_per_s"],
        "ddp_vs_single_rss_per_process": max(ddp["peak_rss_mb_per_process"]) / single["peak_rss_mb_per_process"][0],
        "ddp_vs_hand_sum_rss_per_process": max(ddp["peak_rss_mb_per_process"]) / max(hand["peak_rss_mb_per_process"]),
        "max_loss_difference_vs_single": max(
            abs(a - b)
            for mode in ("ddp", "hand_sum")
            for a, b in zip(results[mode]["losses"], single["losses"], strict=True)
        ),
    }
    record = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out", "loop_file", "output")},
        "runs": results,
        "ratios": {k: round(v, 4) if k.startswith("ddp") else v for k, v in ratios.items()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    for mode, r in results.items():
        print(
            f"{mode:9s} {r['processes']} process(es)  {r['tokens_per_s']:8.1f} tokens/s  peak RSS/process "
            f"{r['peak_rss_mb_per_process']} MB  load {r['load_before']}  wall {r['wall_s']} s"
        )
    for name, value in record["ratios"].items():
        print(f"{name}: {value}")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
