#!/usr/bin/env bash
# The CUDA paths, checked on a machine with an NVIDIA GPU (CI has none): the fast test suite with the GPU
# visible, then the CLI end to end on a small random llama (bf16 evaluation, full and LoRA fine-tuning,
# distillation with an online bf16 teacher and with a cached signal, a merge of the two fine-tunes).
# Run from the repository root with the project importable (PYTHONPATH=. or installed); writes logs and
# run records to $OUT (default ./gpu-check). Nothing is downloaded: models are built locally.
#
#     OUT=/tmp/gpu-check bash bench/gpu_check.sh
#
# Issue 16's engines (bench/engines_check.py: FSDP2 LoRA SFT reloaded and compared, ZeRO-3 distillation, QLoRA
# nf4 with a verified merge, bf16 vs fp32 loss curves, tokens/s and peak GPU memory beside TRL's SFTTrainer):
#
#     bash bench/gpu_check.sh --prepare            # here, with network: bench/wheels/ (bitsandbytes, deepspeed,
#                                                  # trl and what the GPU image lacks; git-ignored, ~55 MB)
#     OUT=... bash bench/gpu_check.sh --engines    # there, no network: install the wheels, run the engine checks
#     bash bench/gpu_check.sh --cpu-smoke          # here: the same driver on a tiny model on the CPU, where the
#                                                  # FSDP2 and ZeRO-3 launches must be refused in one line
# With no flag the whole check runs: tests, the CLI end to end, then the engines.
set -uo pipefail
MODE=${1:-all}
WHEELS=bench/wheels
# For the GPU image (Python 3.12; torch, transformers, accelerate, peft, pandas, pyarrow, ninja, msgpack, psutil,
# py-cpuinfo, nvidia-ml-py there): what lmforge, deepspeed, bitsandbytes and trl need besides.
PACKAGES=(bitsandbytes==0.50.2 trl==1.16.0 datasets dill multiprocess hjson pydantic pydantic-core annotated-types
    typing-inspection optuna alembic sqlalchemy greenlet colorlog mako gguf better-profanity)
if [ "$MODE" = --prepare ]; then
    mkdir -p "$WHEELS"
    PIP=${PIP:-.venv/bin/pip}
    $PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}" || exit 1
    $PIP download --no-deps --no-binary=:all: -d "$WHEELS" deepspeed || exit 1  # source only on PyPI
    du -sh "$WHEELS"
    exit 0
fi
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "$MODE" = --cpu-smoke ]; then
    PY=${PYTHON:-.venv/bin/python}
    CUDA_VISIBLE_DEVICES="" $PY bench/engines_check.py --cpu-smoke --out "$OUT" --work "$WORK"
    exit $?
fi
if [ "$MODE" = --engines ] || [ "$MODE" = all ]; then  # the wheels brought along, installed without network
    SITE=/tmp/lmforge-site
    export PYTHONPATH=$PYTHONPATH:$SITE
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 1
    fi
    if ls "$WHEELS"/deepspeed-*.tar.gz >/dev/null 2>&1; then  # a pure-Python build, its CUDA ops compiled when used
        DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" \
            "$WHEELS"/deepspeed-*.tar.gz >"$OUT/deepspeed_install.log" 2>&1 || tail -5 "$OUT/deepspeed_install.log"
    fi
    $PY -c "import bitsandbytes, trl, deepspeed; print('bitsandbytes', bitsandbytes.__version__, 'trl', \
trl.__version__, 'deepspeed', deepspeed.__version__)"
fi
if [ "$MODE" = --engines ]; then
    $PY bench/engines_check.py --out "$OUT" --work "$WORK"
    exit $?
fi
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
$PY bench/engines_check.py --out "$OUT" --work "$WORK/engines" || failures=$((failures + 1))
echo "failed steps: $failures"
exit $failures
