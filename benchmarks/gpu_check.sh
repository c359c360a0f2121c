#!/usr/bin/env bash
# The GPU checks, as one bounded script for a lent GPU machine (CI has no GPU):
#   bash benchmarks/gpu_check.sh OUTDIR
# 1. the CUDA tests (tests/gpu, the real out-of-memory probe, the chunk halving and its memory
#    checks); 2. the engine benchmark on CUDA; 3. the whole suite with CUDA visible (8 workers).
# Each step has its own time limit (at most 9 minutes in all; about 5 on an H200). Uses the machine's own
# torch/Lightning (no install); the repo root goes on PYTHONPATH.
set -uo pipefail
out="${1:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning, pytorch_lightning as pl; print('torch', torch.__version__, 'pl', pl.__version__)"
} 2>&1 | tee "$out/device.txt"
timeout 180 python3 -m pytest -q -rs -s -p no:cacheprovider -o addopts="" --import-mode=importlib \
  tests/gpu tests/callback/test_cuda_oom.py \
  tests/engine/test_chunking.py::test_cuda_out_of_memory_halves_until_it_fits_and_frees_everything \
  tests/engine/test_chunking.py::test_cuda_out_of_memory_at_one_sample_raises_and_frees_everything \
  tests/engine/test_chunking.py::test_cuda_default_budget_comes_from_free_memory \
  2>&1 | tee "$out/gpu_tests.log" | tail -n 30
timeout 150 python3 benchmarks/bench_engine.py --device cuda --size 224 --n 64 --repeats 5 \
  2>&1 | tee "$out/bench_engine_cuda.log"
# Threads per worker bounded: 8 workers x 16 default threads oversubscribe 16 cores.
OMP_NUM_THREADS=2 timeout 220 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 tests \
  -k "not tensorboard_server" -rfE >"$out/suite_with_cuda.log" 2>&1
echo "suite rc $?"; grep -E "passed|failed|^FAILED|^ERROR" "$out/suite_with_cuda.log" | tail -n 20
