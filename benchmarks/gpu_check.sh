#!/usr/bin/env bash
# The GPU checks, as one bounded script for a lent GPU machine (CI has no GPU):
#   bash benchmarks/gpu_check.sh OUTDIR
# Runs the GPU tests, then the whole suite with CUDA visible, then the engine benchmark on CUDA.
# Uses the machine's own torch/Lightning (no install); the repo root goes on PYTHONPATH.
set -uo pipefail
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, pytorch_lightning as pl; print('torch', torch.__version__, 'pl', pl.__version__)"
} 2>&1 | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" --import-mode=importlib \
  tests/gpu 2>&1 | tee "$out/gpu_tests.log"
timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests -k "not tensorboard_server" \
  2>&1 | tail -n 40 | tee "$out/suite_with_cuda.log"
timeout 240 python3 benchmarks/bench_engine.py --device cuda --size 224 2>&1 | tee "$out/bench_engine_cuda.log"
