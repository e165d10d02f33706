#!/usr/bin/env bash
# The torch loader's 224 px photo rows, files against shards, one run (2026-12-03, the project's 2-core
# machine, no GPU). Data: foolbox's 20 ImageNet JPEGs copied to 384 files (bench/photos.py) and the same
# files as the writer's 12 shards of 32 (as ../2026-12-03-shards-gpu-loaders/run.sh makes them).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results/2026-12-03-shards-torch
W=/tmp/simsiam-bench
$PY -c "from pathlib import Path; from bench.photos import photo_folder; print(photo_folder(Path('$W'), 384))"
[ -f $W/photo-shards/train.json ] || $PY -m pipeline.shards write $W/photos $W/photo-shards --shard-size 32 --ranks 1 --workers 2
cat /proc/loadavg > $OUT/load-before-photos.txt
$PY bench/throughput.py --device cpu --arch resnet18 --image-size 224 --stages loader,model,e2e --batch-sizes 32 \
    --num-images 384 -j 2 --min-images 64 --data $W/photos \
    --loaders torch,torch:data=$W/photo-shards \
    --out $OUT/photos-224 2>&1 | tee $OUT/photos-224.log
cat /proc/loadavg > $OUT/load-after-photos.txt
