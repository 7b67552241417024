"""Issue 16's engine checks on one GPU (`bash bench/gpu_check.sh --engines`), or their CPU part (`--cpu-smoke`).

Each step is the lmforge CLI (or TRL) in its own process with a timeout; a failed step is recorded and the next
one runs. Same random llama, records (the built-in `dates` task's train split), LoRA shape (r 16, alpha 32,
every linear layer), batch, steps, learning rate and schedule everywhere.
- lora_fp32, lora_bf16: LoRA SFT in one plain process, train.mixed_precision no / bf16 (loss curves side by side).
- fsdp2_lora: lora_fp32's run under `accelerate launch --config_file configs/accelerate/fsdp2.yaml
  --num_processes 1`; its saved adapter is reloaded and its logits compared with lora_fp32's.
- distill_plain, zero3_distill: distillation (teacher: the base; student: half its layers) in one plain process
  and under configs/accelerate/zero3.yaml; loss curves compared.
- qlora_nf4: LoRA SFT on the nf4-quantised base, then --merge (the merge is checked against the adapter inside
  lmforge and refused if it differs); loss and memory beside lora_bf16.
- trl_sft: TRL's SFTTrainer with the same settings in bf16: tokens/s and peak GPU memory beside lora_bf16.
Every lmforge step reports training tokens/s (log.jsonl) and the process's peak GPU memory (run.json).
`--cpu-smoke` runs the same driver on a tiny model for 3 steps on the CPU: the FSDP2 and ZeRO-3 steps must then be
refused in one line (they need CUDA), trl_sft runs only where trl is installed. Writes OUT/engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from finetune_vs_trl import TRL_SCRIPT  # the CPU benchmark's TRL SFTTrainer run, bf16 on a GPU

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LORA = ["lora.r=16", "lora.alpha=32.0", "lora.target_modules=[all-linear]"]


def run(name: str, command: list[str], work: Path, timeout: float, env: dict | None = None) -> dict:
    """Run one step; its output goes to WORK/<name>.log (the end of it into the result when the step fails:
    engines.json is all that needs to come back from a GPU machine). Returns {status, wall_s, refusal}."""
    start = time.perf_counter()
    log = work / f"{name}.log"
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        status, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status, text = "timeout", str(expired.stdout or "") + str(expired.stderr or "")
    log.write_text(text)
    # lmforge's one line, or Accelerate's launcher refusing a DeepSpeed config before lmforge starts
    refusals = [line for line in text.splitlines() if line.startswith(("lmforge: error:", "ImportError: DeepSpeed"))]
    result = {"status": status, "wall_s": round(time.perf_counter() - start, 1), "command": " ".join(command)}
    if refusals:
        result["refusal"] = refusals[0]
    if status != 0:
        result["log_tail"] = text[-2500:]
    print(f"step {name}: status {status}, {result['wall_s']} s" + (f" ({refusals[0]})" if refusals else ""))
    return result


def lmforge_metrics(folder: Path) -> dict:
    """Loss curve, training tokens/s, peak GPU memory and the resolved engine of a finished lmforge run."""
    if not (folder / "run.json").is_file():
        return {}
    record = json.loads((folder / "run.json").read_text())
    steps = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    tokens, seconds = sum(s.get("input_tokens", 0) for s in steps), steps[-1]["elapsed_s"] if steps else 0
    return {
        "losses": [round(s["loss"], 5) for s in steps],
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "peak_gpu_bytes": record.get("peak_gpu_bytes"),
        "peak_rss_bytes": record.get("peak_rss_bytes"),
        "engine": record.get("engine"),
    }


def logit_gap(first: Path, second: Path) -> float | None:
    """Largest |logit difference| of two saved models (adapters merged on load) on fixed token ids."""
    if not (first / "run.json").is_file() or not (second / "run.json").is_file():
        return None
    import torch

    from lmforge.models.load import load_model

    ids = torch.arange(3, 67).reshape(2, 32)
    out = []
    for folder in (first, second):
        model = load_model(folder).model
        with torch.no_grad():
            out.append(model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu())
    return float((out[0] - out[1]).abs().max())


def curve_gap(a: dict, b: dict) -> float | None:
    """Largest relative difference between two loss curves, step by step."""
    if not a.get("losses") or not b.get("losses"):
        return None
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["losses"], b["losses"], strict=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (models, runs)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, 3 steps, on the CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from lmforge.models.tiny import make_tiny_llama

    smoke = args.cpu_smoke
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work
    steps, timeout = (3, 240) if smoke else (20, 300)
    shape = (
        dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)
        if smoke
        else dict(hidden=1024, layers=8, heads=16, kv_heads=8, intermediate=2816)
    )
    model = make_tiny_llama(work / "model", seed=0, tie_embeddings=True, **shape)
    records = work / "dates.jsonl"
    lm = [PY, "-m", "lmforge"]
    results: dict = {"cpu_smoke": smoke, "steps": steps, "model_shape": shape}
    results["export"] = run("export", [*lm, "data", "export", "dates", "--split", "train", "--out", str(records)],
                            work, timeout)  # fmt: skip
    rows = records.read_text().splitlines()[: 8 * steps]
    records.write_text("\n".join(rows) + "\n")
    common = ["--model", str(model), "--data", str(records), "--steps", str(steps), "--lr", "1e-4", *LORA]
    common += ["train.batch_size=8", "train.schedule=constant", "train.save_every=1000", "data.val_fraction=0"]
    common += ["data.max_length=256", "eval.probe=false"]
    launch = [PY, "-m", "accelerate.commands.launch", "--num_processes", "1", "--config_file"]
    configs = ROOT / "configs" / "accelerate"
    runs = {
        "lora_fp32": [*lm, "finetune", *common, "train.mixed_precision=no"],
        "lora_bf16": [*lm, "finetune", *common, "train.mixed_precision=bf16"],
        "fsdp2_lora": [*launch, str(configs / "fsdp2.yaml"), "-m", "lmforge", "finetune", *common,
                       "train.mixed_precision=no"],
        "qlora_nf4": [*lm, "finetune", *common, "lora.quantize=nf4", "--merge", "train.mixed_precision=bf16"],
    }  # fmt: skip
    distill = ["--teacher", str(model), "--student-layers", str(shape["layers"] // 2), "--data", str(records)]
    distill += ["--steps", str(steps), "train.batch_size=8", "train.save_every=1000", "data.val_fraction=0"]
    distill += ["eval.probe=false", "eval.limit=16", "train.mixed_precision=no"]
    runs["distill_plain"] = [*lm, "distill", *distill]
    runs["zero3_distill"] = [*launch, str(configs / "zero3.yaml"), "-m", "lmforge", "distill", *distill]
    for name, command in runs.items():
        folder = work / name
        results[name] = run(name, [*command, "--out", str(folder)], work, timeout)
        results[name] |= lmforge_metrics(folder)
    results["fsdp2_lora"]["logit_gap_vs_lora_fp32"] = logit_gap(work / "lora_fp32", work / "fsdp2_lora")
    results["bf16_vs_fp32_curve_gap"] = curve_gap(results["lora_fp32"], results["lora_bf16"])
    results["zero3_vs_plain_curve_gap"] = curve_gap(results["distill_plain"], results["zero3_distill"])
    if not torch.cuda.is_available():  # what the CPU must do with the GPU-only launches: refuse them in one line
        results["cpu_refusals_ok"] = all(
            results[n]["status"] != 0 and "refusal" in results[n] for n in ("fsdp2_lora", "zero3_distill")
        )
    train = [json.loads(line) for line in Path(records).read_text().splitlines() if line.strip()]
    spec = {"model": str(model), "train": train, "batch_size": 8, "steps": steps, "lr": 1e-4, "schedule": "constant",
            "max_length": 256, "seed": 0, "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0},
            "bf16": torch.cuda.is_available(), "scratch": str(work / "trl"), "adapter": str(work / "trl_adapter"),
            "report": str(work / "trl.json")}  # fmt: skip
    (work / "trl_spec.json").write_text(json.dumps(spec))
    (work / "trl_sft.py").write_text(TRL_SCRIPT)
    try:
        import trl  # noqa: F401

        results["trl_sft"] = run("trl_sft", [PY, str(work / "trl_sft.py"), str(work / "trl_spec.json")], work,
                                 timeout, env=dict(os.environ, ACCELERATE_MIXED_PRECISION="no"))  # fmt: skip
        if (work / "trl.json").is_file():
            trl_report = json.loads((work / "trl.json").read_text())
            trl_report["tokens_per_s"] = trl_report["input_tokens"] / trl_report["train_s"]
            results["trl_sft"] |= trl_report
    except ImportError:
        results["trl_sft"] = {"status": "not run: trl is not installed"}
    (args.out / "engines.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=1))
    for name, value in results.items():
        if isinstance(value, dict) and "status" in value:
            summary = {k: value.get(k) for k in ("status", "tokens_per_s", "peak_gpu_bytes", "refusal") if k in value}
            print(f"{name:<14} {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
