#!/usr/bin/env bash
# Multi-GPU correctness, for a machine with 2 or more NVIDIA GPUs (lmforge's own checks ran on one GPU at most):
# the README's launch commands with 2 processes, on each shipped engine (DDP, FSDP2, ZeRO-2, ZeRO-3), against one
# plain process over the same global batch (2 x 4 rows = 1 x 8), float32 so the comparison is tight.
#   - LoRA SFT: the loss curve and the saved adapter;
#   - distillation with a teacher (full fine-tune of the student): the loss curve;
#   - on-policy distillation under ZeRO-3 with 2 processes: must be refused in one line.
# Prints a table and writes $OUT/multigpu.json; exits non-zero when a launch fails or a gap exceeds its tolerance
# (loss curves 1e-4 relative, adapter tensors 1e-5 absolute). ZeRO needs `pip install deepspeed`.
#
#     OUT=/tmp/multigpu bash bench/multigpu_smoke.sh
set -uo pipefail
OUT=${OUT:-multigpu-smoke}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$GPUS" -lt 2 ]; then echo "multigpu_smoke needs 2 or more GPUs; this machine has $GPUS"; exit 2; fi
mkdir -p "$OUT"

M=$WORK/model
$PY -c "from lmforge.models.tiny import make_tiny_llama as m; m('$M', hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, seed=0, tie_embeddings=True)"
SFT=(finetune --model "$M" --task dates --steps 10 --lr 1e-3 train.mixed_precision=no train.save_every=1000
    eval.probe=false eval.limit=8 data.limit=200)
KD=(distill --teacher "$M" --student-layers 2 --task dates --steps 10 train.mixed_precision=no train.save_every=1000
    eval.probe=false eval.limit=8 data.limit=200)
launch() {  # launch CONFIG NAME ARGS...: 2 processes with the shipped config
    local config=$1 name=$2
    shift 2
    $PY -m accelerate.commands.launch --config_file "configs/accelerate/$config.yaml" --num_processes 2 \
        -m lmforge "$@" --out "$WORK/$name" >"$OUT/$name.log" 2>&1
    echo "$name: exit $?"
}
$PY -m lmforge "${SFT[@]}" train.batch_size=8 --out "$WORK/sft-one" >"$OUT/sft-one.log" 2>&1; echo "sft-one: exit $?"
$PY -m lmforge "${KD[@]}" train.batch_size=8 --out "$WORK/kd-one" >"$OUT/kd-one.log" 2>&1; echo "kd-one: exit $?"
for engine in ddp fsdp2 zero2 zero3; do
    launch "$engine" "sft-$engine" "${SFT[@]}" train.batch_size=4
    launch "$engine" "kd-$engine" "${KD[@]}" train.batch_size=4
done
launch zero3 refused-on-policy "${KD[@]}" train.batch_size=4 signal.kind=on_policy

$PY - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

work, out = Path(sys.argv[1]), Path(sys.argv[2])
def losses(folder):
    lines = (folder / "log.jsonl").read_text().splitlines() if (folder / "log.jsonl").is_file() else []
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e]
rows, ok = {}, True
for kind in ("sft", "kd"):
    one = losses(work / f"{kind}-one")
    for engine in ("ddp", "fsdp2", "zero2", "zero3"):
        folder = work / f"{kind}-{engine}"
        two = losses(folder)
        gap = max((abs(a - b) / abs(a) for a, b in zip(one, two)), default=None) if one and len(one) == len(two) else None
        row = {"finished": (folder / "run.json").is_file(), "loss_curve_gap": gap}
        if kind == "sft" and row["finished"]:
            a = load_file(work / "sft-one" / "adapter_model.safetensors")
            b = load_file(folder / "adapter_model.safetensors")
            row["adapter_gap"] = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else None
        good = row["finished"] and gap is not None and gap < 1e-4 and row.get("adapter_gap", 0) is not None
        good = good and (row.get("adapter_gap") or 0) < 1e-5
        row["ok"] = good
        ok &= good
        rows[f"{kind}-{engine}"] = row
        print(f"{kind}-{engine:<6} {json.dumps(row)}")
log = (out / "refused-on-policy.log").read_text()
refused = [l for l in log.splitlines() if l.startswith("lmforge: error:") and "generates text" in l]
rows["on_policy_under_zero3_refused"] = bool(refused)
ok &= bool(refused)
print("on-policy under ZeRO-3 refused:", refused[:1])
(out / "multigpu.json").write_text(json.dumps(rows, indent=2) + "\n")
sys.exit(0 if ok else 1)
EOF
