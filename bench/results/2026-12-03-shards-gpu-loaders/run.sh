#!/usr/bin/env bash
# The two benchmark runs of this folder, as they were run (2026-12-03, the project's 2-core machine,
# no GPU). Data: foolbox's 20 ImageNet JPEGs copied to 384 files (bench/photos.py, as
# bench/dali_compare.py uses them) and the same files as 12 shards of 32; Fashion-MNIST as files
# (data/fashion-mnist) and as the writer's 60 shards of 1000 (data/fashion-mnist-shards).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results/2026-12-03-shards-gpu-loaders
W=/tmp/simsiam-bench
$PY -c "from pathlib import Path; from bench.photos import photo_folder; print(photo_folder(Path('$W'), 384))"
[ -f $W/photo-shards/train.json ] || $PY -m pipeline.shards write $W/photos $W/photo-shards --shard-size 32 --ranks 1 --workers 2
cat /proc/loadavg > $OUT/loadavg-before-photos.txt
$PY bench/throughput.py --device cpu --arch resnet18 --image-size 224 --stages loader,model,e2e --batch-sizes 32 \
    --num-images 384 -j 2 --min-images 64 --data $W/photos \
    --loaders dali,dali:data=$W/photo-shards,torchvision-gpu,torchvision-gpu:data=$W/photo-shards \
    --out $OUT/photos-224 2>&1 | tee $OUT/photos-224.log
cat /proc/loadavg > $OUT/loadavg-before-fashion-mnist.txt
$PY bench/throughput.py --device cpu --arch resnet18 --image-size 32 --stages loader,model,e2e --batch-sizes 128 \
    --num-images 4096 -j 2 --data data/fashion-mnist \
    --loaders dali,dali:data=data/fashion-mnist-shards,torchvision-gpu,torchvision-gpu:data=data/fashion-mnist-shards \
    --out $OUT/fashion-mnist-32 2>&1 | tee $OUT/fashion-mnist-32.log
cat /proc/loadavg > $OUT/loadavg-after.txt
# Loader-only again with windows of 30 batches (the runs above: 10), when the machine was quieter.
cat /proc/loadavg > $OUT/loadavg-before-loader-long.txt
$PY bench/throughput.py --device cpu --arch resnet18 --image-size 32 --stages loader --batch-sizes 128 \
    --num-images 4096 -j 2 --loader-min-steps 30 --data data/fashion-mnist \
    --loaders dali,dali:data=data/fashion-mnist-shards,torchvision-gpu,torchvision-gpu:data=data/fashion-mnist-shards \
    --out $OUT/fashion-mnist-32-loader-long 2>&1 | tee $OUT/fashion-mnist-32-loader-long.log
$PY bench/throughput.py --device cpu --arch resnet18 --image-size 224 --stages loader --batch-sizes 32 \
    --num-images 384 -j 2 --loader-min-steps 30 --data $W/photos \
    --loaders dali,dali:data=$W/photo-shards,torchvision-gpu,torchvision-gpu:data=$W/photo-shards \
    --out $OUT/photos-224-loader-long 2>&1 | tee $OUT/photos-224-loader-long.log
cat /proc/loadavg > $OUT/loadavg-after-loader-long.txt
