#!/usr/bin/env bash
# The prepared GPU run for a lent H200 (issue 9), < 8 minutes, partial results kept:
#
#   source .kit/install.sh && bash bench/gpu_check.sh OUT_DIR      # on the GPU host (DALI + FFCV from the kit)
#   bash bench/gpu_check.sh --rehearse OUT_DIR                     # the same sections on the CPU at toy sizes
#
# OUT_DIR defaults to $OUT, else bench/results/gpu-check. Sections, time limits and outputs:
# bench/gpu_check.py (its docstring); README "Measured on a GPU" gives the whole procedure.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
