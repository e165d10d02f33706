#!/usr/bin/env bash
# GPU check for a lent H200 (torch 2.11 / Python 3.12, no DALI or FFCV): < 5 minutes.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else bench/results/gpu-check
#
# Measures, with bench/throughput.py, SimSiam resnet50 at 224 px, AMP bf16, channels_last,
# batch 64 -> 1024: loader-only and end-to-end with the torch loader, and model-only (synthetic
# views on the GPU). Writes OUT_DIR/throughput.{json,csv} (the JSON is rewritten after every point,
# so a run cut short still leaves its measured points), OUT_DIR/env.txt and the log.
# Data: $GPU_DATA (an ImageFolder) if set, else 2048 generated 500x375 JPEGs (bench/gpu_data.py).
# Guards: every point is skipped when its projected cost exceeds BUDGET_S (default 40 s), and the
# whole run is killed after LIMIT_S (default 270 s).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu-check}}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-40}
LIMIT_S=${LIMIT_S:-270}
BATCHES=${BATCHES:-64,128,256,512,1024}
mkdir -p "$OUT_DIR"
start=$(date +%s)

$PY - > "$OUT_DIR/env.txt" 2>&1 <<'PYEOF'
import os, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "cpus", os.cpu_count())
for m in ("torchvision", "numpy", "PIL", "psutil", "matplotlib"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except ImportError as e:
        print(m, "MISSING", e)
PYEOF
cat "$OUT_DIR/env.txt"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing measured" | tee "$OUT_DIR/error.txt"
    exit 2
fi

DATA=${GPU_DATA:-/tmp/simsiam-gpu-photos}
if [ -z "${GPU_DATA:-}" ]; then
    echo "writing 2048 generated JPEGs to $DATA"
    $PY bench/gpu_data.py "$DATA" --n 2048 --workers 8 || { echo "gpu_check: data generation failed"; exit 3; }
fi
echo "data ready after $(( $(date +%s) - start )) s"

WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
timeout --signal=INT --kill-after=20 "$LIMIT_S" \
    $PY bench/throughput.py --device cuda --arch resnet50 --image-size 224 --amp bf16 --channels-last \
        --stages loader,model,e2e --loaders torch --workers "$WORKERS" --batch-sizes "$BATCHES" \
        --num-images 2048 --data "$DATA" --budget-s "$BUDGET_S" --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check: exit $rc after $(( $(date +%s) - start )) s; results in $OUT_DIR"
exit "$rc"
