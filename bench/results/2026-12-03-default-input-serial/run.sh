#!/usr/bin/env bash
# The default run's input check on its own settings (--recipe fmnist, 28 px, batch 128), in one run:
# model-only, then end to end with the torch loader, DALI overlapped beside the step (DALI's default
# executor), DALI serially between steps, and DALI overlapped with one thread. 2026-12-03, the project's
# 2-core machine, nothing else running. When it ran, serial was briefly the CPU default and was spelled
# plain `dali`: the files here name the serial series `dali`; today's spelling is below.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=bench/results/2026-12-03-default-input-serial
cat /proc/loadavg > $OUT/load-before.txt
${PYTHON:-.venv/bin/python} bench/throughput.py --recipe fmnist --image-size 28 --stages model,e2e \
    --loaders torch,dali:overlap=1,dali:overlap=0,dali:overlap=1:workers=1 --min-images 1024 --warmup 3 --repeats 5 --remeasure 0 \
    --out $OUT 2>&1 | tee $OUT/run.log
cat /proc/loadavg > $OUT/load-after.txt
