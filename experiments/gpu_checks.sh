#!/usr/bin/env bash
# One accelerator session's checks (BENCHMARKS.md "GPU"): paper-width throughput of the GLP
# train step, FD sampling, the SAE step and the delta-LM hook. Writes logs to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD
PY=${PY:-python3}
run() { echo "### $*"; timeout 150 "$@" 2>&1 | grep -v "^WARNING\|^W0000\|^I0000" | tail -40; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
run $PY experiments/bench_train.py --d 2048 --n-layers 3 --batch 4096 --steps 10 --bf16
run $PY experiments/bench_fd.py --d 2048 --n-layers 3 --batch 4096 --steps 50 --batches 2 --reps 10 --rounds 2 --bf16
run $PY experiments/bench_sae.py --d 2048 --expansion 16 --k 32 --batch 4096 --steps 10 --bf16
run $PY experiments/bench_delta_lm.py --synthetic --device cuda --n-seqs 512 --length 128 --batch-size 64
} 2>&1 | tee "$OUT/gpu_checks.log"
