"""`lmforge finetune` (LoRA SFT) side by side with TRL's SFTTrainer (trl 1.16.0).

Both tools train a LoRA adapter (r=16, alpha=32, dropout 0, every linear layer but the head) on the same base
model folder (`--model`, default: lmforge's `default` SmolLM2-135M-Instruct folder), in fp32 on the CPU, on the
same records: the first `--train + --val` records of the built-in `dates` task's train split as
{"prompt", "completion": answer}, split into train/validation with lmforge's own seeded `split_records`
(lmforge reads them from a jsonl file with `data.val_fraction`; TRL gets the same training records as a
conversational prompt-completion dataset, so it applies the chat template and trains on completions only, listed in
the order lmforge's loop draws them and read sequentially, so both tools see the same batches in the same order).
Same batch size, steps, peak learning rate (default 1e-4, low enough that 30 steps stop short of
convergence, so the validation losses compare) and schedule (cosine or constant, no warmup, AdamW with weight
decay 0, gradient clipping at 1.0), max sequence length; no packing, no gradient checkpointing, nothing evaluated during
training. lmforge scores nothing before/after (data from a file, no eval.task, eval.probe false); it still computes
its end-of-training validation loss, which TRL does not, so its training time is read from its log.jsonl.

For each run (each tool in its own subprocess; order alternates between repeats):
- training tokens/s: input (non-pad) tokens of all training batches / seconds of the training loop
  (lmforge: log.jsonl `input_tokens` and the last step's `elapsed_s`; TRL: its logged cumulative `num_tokens`
  and a callback's clock from on_train_begin to the last on_step_end);
- whole-process wall seconds (start-up, imports, model load, tokenisation, training, saving), labelled as such;
- peak RSS of the child (os.wait4).
Afterwards each adapter (TRL's, written to a temp folder, and lmforge's output folder) is loaded onto the base in
this process and scored the same way: mean completion-token cross-entropy over the validation records rendered
with lmforge's `render_example` (chat template, completion + EOS labelled). Medians over `--repeats`.

Targets (from the issue): lmforge >= 1.2x TRL's training tokens/s and <= 0.8x its peak RSS, at equal validation
loss (within 2% relative).

TRL is installed into its own virtualenv (bench/.venv-trl, created if missing: the CPU torch wheel first, then
trl==1.16.0 with transformers, tokenizers, accelerate and peft pinned to the versions lmforge runs on).

Run from the repository root (about 10 minutes on 2 cores, plus the one-off TRL install):

    .venv/bin/python bench/finetune_vs_trl.py --threads 1
    .venv/bin/python bench/finetune_vs_trl.py --threads 1 --repeats 3   # medians of 3
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import peers

ROOT = Path(__file__).resolve().parent.parent
PEER = "trl==1.16.0"
SHARED_PINS = ("transformers", "tokenizers", "accelerate", "peft")  # pinned in the peer venv to lmforge's versions
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOOLS = ("lmforge", "trl")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
TARGET_SPEED, TARGET_RSS, TARGET_LOSS = 1.2, 0.8, 0.02

# Runs in the TRL virtualenv: argv[1] is a JSON spec written by `trl_spec`.
TRL_SCRIPT = r'''
import json
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

spec = json.loads(open(sys.argv[1]).read())


class Clock(TrainerCallback):
    """Seconds of the training loop: on_train_begin to the last on_step_end."""

    start = end = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
dataset = Dataset.from_list(
    [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }
        for r in spec["train"]
    ]
)
config = SFTConfig(
    output_dir=spec["scratch"],
    per_device_train_batch_size=spec["batch_size"],
    gradient_accumulation_steps=1,
    max_steps=spec["steps"],
    learning_rate=spec["lr"],
    lr_scheduler_type=spec["schedule"],
    warmup_steps=0,
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_length=spec["max_length"],
    packing=False,
    completion_only_loss=True,
    gradient_checkpointing=False,
    bf16=spec.get("bf16", False),  # bench/engines_check.py's GPU run compares bf16
    fp16=False,
    use_cpu=not torch.cuda.is_available(),
    report_to="none",
    eval_strategy="no",
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    dataloader_num_workers=0,
    seed=spec["seed"],
    train_sampling_strategy="sequential",  # the rows come in lmforge's order already
)
peft_config = LoraConfig(
    r=spec["lora"]["r"],
    lora_alpha=spec["lora"]["alpha"],
    lora_dropout=spec["lora"]["dropout"],
    target_modules="all-linear",
    task_type="CAUSAL_LM",
)
clock = Clock()
trainer = SFTTrainer(
    model=model,
    args=config,
    train_dataset=dataset,
    processing_class=tokenizer,
    peft_config=peft_config,
    callbacks=[clock],
)
first = trainer.train_dataset[0]


def trained(row):
    """The token ids TRL puts loss on (its dataset holds labels or a completion mask, by version)."""
    if "labels" in row:
        return [t for t in row["labels"] if t != -100]
    if "completion_mask" in row:
        return [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]
    return []


trainer.train()
trainer.model.save_pretrained(spec["adapter"])
steps = [h for h in trainer.state.log_history if "loss" in h]
report = {
    "train_s": clock.end - clock.start,
    "input_tokens": steps[-1].get("num_tokens"),
    "steps": len(steps),
    "first_loss": steps[0]["loss"],
    "losses": [h["loss"] for h in steps],
    "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    "last_loss": steps[-1]["loss"],
    "optim": str(config.optim),
    "dataset_columns": trainer.train_dataset.column_names,
    "first_example": {"input_ids": list(first["input_ids"]), "trained": trained(first)},
    "example_lengths": [len(row["input_ids"]) for row in trainer.train_dataset],
    "completion_tokens": [len(trained(row)) for row in trainer.train_dataset],
}
open(spec["report"], "w").write(json.dumps(report))
'''


@dataclass
class RunResult:
    """What one child process cost and what its training loop reported."""

    tool: str
    repeat: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    train_s: float
    input_tokens: int
    tokens_per_s: float
    val_loss: float = math.nan
    load_1m_before: float | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- setup


def make_records(n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(all records, train, validation): lmforge's own split of the first n_train + n_val `dates` records."""
    from lmforge.data import synthetic
    from lmforge.data.sources import split_records

    records = [{"prompt": r["prompt"], "completion": r["answer"]} for r in synthetic.examples("dates", "train")]
    records = records[: n_train + n_val]
    train, val = split_records(records, val_fraction(n_train, n_val), seed)
    if len(val) != n_val:
        raise RuntimeError(f"split gave {len(val)} validation records, not {n_val}")
    return records, train, val


def val_fraction(n_train: int, n_val: int) -> float:
    return n_val / (n_train + n_val)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def lmforge_config(args: argparse.Namespace, folder: Path, data: Path, output: Path) -> dict:
    """An SFTConfig as a dict (written as JSON, which is YAML): train only, no before/after scoring."""
    return {
        "model": str(folder),
        "output": str(output),
        "method": "lora",
        "overwrite": True,
        "data": {
            "path": str(data),
            "val_fraction": val_fraction(args.train, args.val),
            "max_length": args.max_length,
            "packing": False,
        },
        "train": {
            "lr": args.lr,
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "grad_accum": 1,
            "warmup_steps": 0,
            "schedule": args.schedule,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "eval_every": 0,
            "save_every": args.steps + 1,
            "seed": args.seed,
        },
        "lora": {**LORA, "target_modules": ["all-linear"]},
        "eval": {"probe": False},
    }


def lmforge_sequence(train: list[dict], args: argparse.Namespace) -> list[dict]:
    """The rows lmforge's loop trains on, in its order (seeded shuffle per epoch), for TRL to read sequentially.

    Same data order in both tools removes the largest source of difference in the final validation loss.
    """
    from lmforge.train.loop import epoch_order

    sequence: list[dict] = []
    epoch = 0
    while len(sequence) < args.steps * args.batch_size:
        sequence += [train[i] for i in epoch_order(len(train), args.seed, epoch)]
        epoch += 1
    return sequence[: args.steps * args.batch_size]


def trl_spec(args: argparse.Namespace, folder: Path, train: list[dict], run_dir: Path) -> dict:
    return {
        "model": str(folder),
        "train": lmforge_sequence(train, args),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "lr": args.lr,
        "schedule": args.schedule,
        "max_length": args.max_length,
        "seed": args.seed,
        "lora": LORA,
        "scratch": str(run_dir / "scratch"),
        "adapter": str(run_dir / "adapter"),
        "report": str(run_dir / "report.json"),
    }


# ---------------------------------------------------------------- measuring


def read_lmforge_log(output: Path) -> tuple[float, int, dict]:
    """(training-loop seconds, input tokens, extras) from lmforge's log.jsonl."""
    entries = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines() if line]
    steps = [e for e in entries if "loss" in e]
    evals = [e["eval"]["val_loss"] for e in entries if "eval" in e]
    extra = {
        "steps": len(steps),
        "first_loss": steps[0]["loss"],
        "last_loss": steps[-1]["loss"],
        "trained_tokens": sum(e["tokens"] for e in steps),
        "own_val_loss": evals[-1] if evals else None,
    }
    return steps[-1]["elapsed_s"], sum(e["input_tokens"] for e in steps), extra


def run_tool(tool: str, repeat: int, args: argparse.Namespace, folder: Path, peer: Path, workdir: Path) -> RunResult:
    """One training run of `tool` in its own subprocess; the adapter lands in run_dir/adapter."""
    run_dir = workdir / f"{tool}-{repeat}"
    run_dir.mkdir()
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(run_dir / "hf_datasets")}
    if args.threads:
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if tool == "lmforge":
        config = run_dir / "sft.yaml"
        config.write_text(json.dumps(lmforge_config(args, folder, workdir / "records.jsonl", run_dir / "adapter")))
        command = [str(args.lmforge_python), "-m", "lmforge.cli", "finetune", str(config)]
    else:
        spec = run_dir / "spec.json"
        spec.write_text(json.dumps(trl_spec(args, folder, json.loads((workdir / "train.json").read_text()), run_dir)))
        command = [str(peer), str(workdir / "trl_sft.py"), str(spec)]
    print(f"[{repeat + 1}/{args.repeats}] {tool:<8} ...", end=" ", flush=True)
    load = os.getloadavg()[0]  # other work on a shared machine shows here
    wall, cpu, rss = peers.measure(command, env, run_dir / "log.txt", args.timeout)
    if tool == "lmforge":
        train_s, tokens, extra = read_lmforge_log(run_dir / "adapter")
    else:
        report = json.loads((run_dir / "report.json").read_text())
        train_s, tokens = report.pop("train_s"), int(report.pop("input_tokens"))
        extra = report
    result = RunResult(tool, repeat, wall, cpu, rss, train_s, tokens, tokens / train_s, load_1m_before=load)
    result.extra = extra
    print(f"{wall:6.1f} s wall, {train_s:6.1f} s training, {rss:6.0f} MB peak RSS (load before {load:.1f})")
    return result


# ---------------------------------------------------------------- scoring


def load_scorer(folder: Path):
    """The base model and tokenizer, loaded once for scoring every adapter."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def completion_loss(model, tokenizer, records: list[dict], max_length: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per labelled token (completion + EOS, lmforge's render_example) over `records`."""
    import torch
    import torch.nn.functional as F

    from lmforge.data.chat import render_example
    from lmforge.data.packing import collate

    examples = [render_example(tokenizer, record, max_length) for record in records]
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "position_ids": list(range(len(e.input_ids)))} for e in examples
    ]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            total += float(F.cross_entropy(logits[:, :-1][keep], labels[keep], reduction="sum"))
            tokens += int(keep.sum())
    return total / tokens


def adapter_loss(base, tokenizer, adapter: Path, records: list[dict], max_length: int) -> float:
    """Validation loss of `adapter` on `base`; the base is left without LoRA layers afterwards."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    try:
        return completion_loss(model, tokenizer, records, max_length)
    finally:
        model.unload()


def tokenisation_check(tokenizer, train: list[dict], trl_extra: dict, max_length: int) -> dict:
    """How TRL's tokenised training rows compare with lmforge's render_example on the same records."""
    from lmforge.data.chat import render_example

    ours = [render_example(tokenizer, record, max_length) for record in train]
    first_ids = trl_extra["first_example"]["input_ids"]
    first_trained = trl_extra["first_example"]["trained"]
    check = {
        "lmforge_input_tokens": sum(len(e.input_ids) for e in ours),
        "trl_input_tokens": sum(trl_extra["example_lengths"]),
        "lmforge_labelled_tokens": sum(sum(label != -100 for label in e.labels[1:]) for e in ours),
        "trl_completion_tokens": sum(trl_extra["completion_tokens"]),
        "first_example_same_input_ids": first_ids == ours[0].input_ids,
    }
    check["first_example_trl_trained"] = tokenizer.decode(first_trained)
    check["first_example_lmforge_trained"] = tokenizer.decode([t for t in ours[0].labels if t != -100])
    return check


# ---------------------------------------------------------------- comparing


def summarise(runs: list[RunResult], base_loss: float) -> dict:
    """Medians per tool, ratios lmforge / TRL, and the targets' verdicts."""
    summary: dict = {}
    for tool in TOOLS:
        mine = [r for r in runs if r.tool == tool]
        summary[tool] = {
            key: statistics.median(getattr(r, key) for r in mine)
            for key in ("tokens_per_s", "train_s", "input_tokens", "wall_s", "cpu_s", "peak_rss_mb", "val_loss")
        }
    ours, theirs = summary["lmforge"], summary["trl"]
    speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
    rss = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    loss_diff = abs(ours["val_loss"] - theirs["val_loss"]) / theirs["val_loss"]
    summary["base_val_loss"] = base_loss
    summary["ratios"] = {
        "tokens_per_s_lmforge_over_trl": speed,
        "peak_rss_lmforge_over_trl": rss,
        "wall_lmforge_over_trl": ours["wall_s"] / theirs["wall_s"],
        "val_loss_rel_diff": loss_diff,
    }
    summary["targets"] = {
        f"tokens_per_s >= {TARGET_SPEED}x TRL": speed >= TARGET_SPEED,
        f"peak_rss <= {TARGET_RSS}x TRL": rss <= TARGET_RSS,
        f"val_loss within {TARGET_LOSS:.0%}": loss_diff <= TARGET_LOSS,
    }
    return summary


def print_table(summary: dict) -> None:
    ours, theirs, ratios = summary["lmforge"], summary["trl"], summary["ratios"]
    head = f"{'measure (median)':<34} {'lmforge':>10} {'TRL':>10}  ratio lmforge/TRL (target)"
    print("\n" + head + "\n" + "-" * (len(head) + 8))
    verdict = summary["targets"]
    rows = [
        ("training tokens/s", "tokens_per_s", f"{ratios['tokens_per_s_lmforge_over_trl']:.2f}x (>= {TARGET_SPEED})"),
        ("training loop s", "train_s", f"{ours['train_s'] / theirs['train_s']:.2f}x"),
        ("input tokens trained on", "input_tokens", f"{ours['input_tokens'] / theirs['input_tokens']:.2f}x"),
        ("whole-process wall s (incl. load)", "wall_s", f"{ratios['wall_lmforge_over_trl']:.2f}x"),
        ("whole-process cpu s", "cpu_s", f"{ours['cpu_s'] / theirs['cpu_s']:.2f}x"),
        ("peak RSS MB", "peak_rss_mb", f"{ratios['peak_rss_lmforge_over_trl']:.2f}x (<= {TARGET_RSS})"),
        ("val loss (same scorer)", "val_loss", f"rel diff {ratios['val_loss_rel_diff']:.2%} (<= {TARGET_LOSS:.0%})"),
    ]
    for label, key, note in rows:
        print(f"{label:<34} {_fmt(ours[key]):>10} {_fmt(theirs[key]):>10}  {note}")
    print(f"{'val loss of the base model':<34} {_fmt(summary['base_val_loss']):>10}")
    print("\ntargets: " + ", ".join(f"{name}: {'MET' if ok else 'NOT met'}" for name, ok in verdict.items()) + "\n")


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200, help="training records (default 200)")
    parser.add_argument("--val", type=int, default=20, help="validation records (default 20)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps (default 30)")
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4: short of convergence)"
    )
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine", help="no warmup either way")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool, order alternating (default 1)")
    parser.add_argument("--model", default="default", help="lmforge model reference; both tools load its folder")
    parser.add_argument("--peer-venv", type=Path, default=ROOT / "bench" / ".venv-trl")
    parser.add_argument("--lmforge-python", type=Path, default=peers.main_python())
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "finetune_vs_trl.json")
    parser.add_argument("--threads", type=int, help="OMP/MKL threads for both tools (default: their own choice)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child run is killed")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, adapters)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if min(args.train, args.val, args.batch_size, args.steps, args.repeats, args.max_length) < 1:
        raise SystemExit("--train, --val, --batch-size, --steps, --repeats and --max-length must be >= 1")
    sys.path.insert(0, str(ROOT))
    from lmforge.models.load import resolve_model

    folder = resolve_model(args.model)  # both tools load this folder (no per-run GGUF hashing for lmforge)
    peer = peers.ensure_peer_venv(args.peer_venv, PEER, "trl", SHARED_PINS)
    workdir = Path(tempfile.mkdtemp(prefix="finetune_vs_trl-"))
    try:
        records, train, val = make_records(args.train, args.val, args.seed)
        write_jsonl(workdir / "records.jsonl", records)  # lmforge splits these itself, as make_records did
        (workdir / "train.json").write_text(json.dumps(train))
        (workdir / "trl_sft.py").write_text(TRL_SCRIPT)
        runs: list[RunResult] = []
        for repeat in range(args.repeats):
            tools = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
            runs += [run_tool(tool, repeat, args, folder, peer, workdir) for tool in tools]
        print("scoring the adapters on the validation records ...", flush=True)
        base, tokenizer = load_scorer(folder)
        base_loss = completion_loss(base, tokenizer, val, args.max_length)
        for run in runs:
            adapter = workdir / f"{run.tool}-{run.repeat}" / "adapter"
            run.val_loss = adapter_loss(base, tokenizer, adapter, val, args.max_length)
        trl_extra = next(r.extra for r in runs if r.tool == "trl")
        tokenisation = tokenisation_check(tokenizer, lmforge_sequence(train, args), trl_extra, args.max_length)
        summary = summarise(runs, base_loss)
        print_table(summary)
        print("tokenisation: " + json.dumps(tokenisation, indent=2))
        write_report(args, folder, peer, summary, tokenisation, runs)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def write_report(
    args: argparse.Namespace, folder: Path, peer: Path, summary: dict, tokenisation: dict, runs: list[RunResult]
) -> None:
    for run in runs:  # the raw token lists are for the tokenisation check, not the report
        bulky = ("first_example", "example_lengths", "completion_tokens")
        run.extra = {k: v for k, v in run.extra.items() if k not in bulky}
    report = {
        "benchmark": "finetune_vs_trl",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "model": args.model,
            "model_folder": str(folder),
            "task": "dates (train split)",
            "train_records": args.train,
            "val_records": args.val,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "lr": args.lr,
            "schedule": args.schedule,
            "warmup_steps": 0,
            "max_length": args.max_length,
            "lora": LORA,
            "dtype": "float32",
            "device": "cpu",
            "threads": args.threads,
            "repeats": args.repeats,
        },
        "machine": peers.machine(),
        "versions": {
            "lmforge": {n: importlib.metadata.version(n) for n in ("lmforge", "torch", *SHARED_PINS)},
            "trl": {n: peers.installed_version(peer, n) for n in ("trl", "torch", "datasets", *SHARED_PINS)},
        },
        "summary": summary,
        "tokenisation": tokenisation,
        "runs": [asdict(run) for run in runs],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")


if __name__ == "__main__":
    sys.exit(main())
