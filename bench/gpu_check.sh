#!/usr/bin/env bash
# The CUDA paths, checked on a machine with an NVIDIA GPU (CI has none): the fast test suite with the GPU
# visible, then the CLI end to end on a small random llama (bf16 evaluation, full and LoRA fine-tuning,
# distillation with an online bf16 teacher and with a cached signal, a merge of the two fine-tunes).
# Run from the repository root with the project importable (PYTHONPATH=. or installed); writes logs and
# run records to $OUT (default ./gpu-check). Nothing is downloaded: models are built locally.
#
#     OUT=/tmp/gpu-check bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
failures=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report the status and wall time
    local name=$1 start=$SECONDS
    shift
    "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "step $name: status $status, $((SECONDS - start)) s"
    if [ $status -ne 0 ]; then failures=$((failures + 1)); tail -15 "$OUT/$name.log"; fi
}

nvidia-smi -L
$PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'transformers', transformers.__version__, \
'peft', peft.__version__, 'accelerate', accelerate.__version__)"

if [ -z "${SKIP_TESTS:-}" ]; then
    step pytest $PY -m pytest -q -p no:cacheprovider -m "not slow" -n "${WORKERS:-8}" --tb=short ${TESTS:-tests}
    grep -E "passed|failed" "$OUT/pytest.log" | tail -1
    grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -40
fi

M=$WORK/model
$PY -c "from lmforge.models.tiny import make_tiny_llama as m; m('$M', hidden=256, layers=4, heads=8, kv_heads=4, intermediate=688, seed=0, tie_embeddings=True)"
LM="$PY -m lmforge.cli"
step eval_bf16 $LM eval "$M" --task extraction --limit 16 --dtype bfloat16 --out "$WORK/eval"
step finetune_full $LM finetune --model "$M" --task extraction --method full --steps 30 --lr 1e-3 --out "$WORK/full"
step finetune_lora $LM finetune --model "$M" --task dates --method lora --steps 30 --lr 3e-3 --merge --out "$WORK/lora"
common=(student_layers=2 train.max_steps=20 train.eval_every=10 data.limit=256 data.max_length=512 eval.limit=16)
step distill_online $LM distill configs/distill_extraction.yaml teacher="$WORK/full" output="$WORK/distill" "${common[@]}"
step distill_cached $LM distill configs/distill_cached_topk.yaml teacher="$WORK/full" output="$WORK/cached" "${common[@]}"
step merge_ties $LM merge --method ties --base "$M" "$WORK/full" "$WORK/lora" --density 0.5 --weight 0.5 "$WORK/merged"
step eval_merged $LM eval "$WORK/merged" --task extraction --limit 16 --out "$WORK/eval-merged"

for run in eval full lora distill cached merged eval-merged; do
    [ -f "$WORK/$run/run.json" ] && cp "$WORK/$run/run.json" "$OUT/run-$run.json"
done
$PY - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*/run.json")):
    r = json.loads(run.read_text())
    gpu = r.get("peak_gpu_bytes")
    print(f"{run.parent.name:<12} device {r.get('hardware', {}).get('gpu')}, wall {r.get('wall_s')} s, "
          f"peak GPU {gpu and round(gpu / 2**20)} MB, metrics {json.dumps(r.get('metrics'))[:300]}")
EOF
echo "failed steps: $failures"
exit $failures
