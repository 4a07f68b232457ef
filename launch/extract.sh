#!/usr/bin/env bash
# Activation extraction on a GPU node: train and validation stores of one model/layer.
#   MODEL=meta-llama/Llama-3.2-1B LAYERS=7 NAME=llama1b-l07-fineweb \
#   CORPUS=hf:HuggingFaceFW/fineweb:sample-10BT TRAIN_TOKENS=1024000000 launch/extract.sh
# Many workers, one logical train store (each worker: its own GPU, documents i % N == w):
#   WORKERS=8 ... launch/extract.sh            8 processes on this node, GPU i for worker i
#   sbatch --ntasks=32 --gpus-per-task=1 --requeue --wrap "srun env WORKERS=slurm ... launch/extract.sh"
#                                              one worker per SLURM task (SLURM_PROCID/NTASKS)
# A worker stopped by SIGTERM commits its finished documents and exits 75; it is rerun
# (it resumes) by common.sh's run_retrying, at most MAX_RETRIES times. A signal to this
# script itself (Ctrl-C, the job ending) stops the loop; under SLURM, --requeue then
# restarts the job, which resumes.
source "$(dirname "$0")/common.sh"
MODEL="${MODEL:-smollm2}"
LAYERS="${LAYERS:-middle}"
CORPUS="${CORPUS:-fortune}"
NAME="${NAME:?set NAME (the store folder under DATA_ROOT)}"
DEVICE="${DEVICE:-cuda}"
WORKERS="${WORKERS:-1}"
COMMON=(--model "$MODEL" --layers "$LAYERS" --corpus "$CORPUS" --device "$DEVICE"
        --llm-dtype "${LLM_DTYPE:-bfloat16}" --batch-tokens "${BATCH_TOKENS:-65536}"
        --seed "${SEED:-42}")
VAL=("$GLP" extract "${COMMON[@]}" --split val --max-tokens "${VAL_TOKENS:-10000000}"
     --out "${DATA_ROOT}/${NAME}/val")
TRAIN=("$GLP" extract "${COMMON[@]}" --split train --max-tokens "${TRAIN_TOKENS:-1024000000}"
       --out "${DATA_ROOT}/${NAME}/train")

if [[ "$WORKERS" == "slurm" ]]; then
  # Every task runs this script; task 0 also writes the (small) validation store.
  if [[ "${SLURM_PROCID:-0}" == "0" ]]; then run_retrying "${VAL[@]}"; fi
  run_retrying "${TRAIN[@]}" --workers slurm
elif [[ "$WORKERS" -gt 1 ]]; then
  run_retrying "${VAL[@]}"
  pids=()
  # Background workers ignore the terminal's SIGINT in their loop (bash rule for background
  # jobs): a signal to this script is passed on as SIGTERM, which ends each worker's loop.
  trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
  for ((w = 0; w < WORKERS; w++)); do
    gpu=()
    if [[ "$DEVICE" == cuda* ]]; then gpu=(env "CUDA_VISIBLE_DEVICES=$w"); fi
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
      run_retrying "${gpu[@]}" "${TRAIN[@]}" --worker "$w" --workers "$WORKERS"
    else
      run_retrying "${gpu[@]}" "${TRAIN[@]}" --worker "$w" --workers "$WORKERS" &
      pids+=($!)
    fi
  done
  status=0
  for pid in "${pids[@]}"; do  # a trapped signal interrupts `wait`: wait again for the worker
    while true; do
      rc=0; wait "$pid" || rc=$?
      if [[ $rc -gt 128 ]] && kill -0 "$pid" 2>/dev/null; then continue; fi
      break
    done
    if [[ $rc -ne 0 ]]; then status=$rc; fi
  done
  exit "$status"
else
  run_retrying "${VAL[@]}"
  run_retrying "${TRAIN[@]}"
fi
