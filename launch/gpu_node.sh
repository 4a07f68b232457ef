#!/usr/bin/env bash
# All GPUs of one node in one process: the mesh fills the data axis (mesh_data=-1) unless
# MESH_FSDP>1 shards parameters too. A preempted run (exit 75 after SIGTERM) is rerun
# and resumes, at most MAX_RETRIES times.
#   CONFIG=experiments/paper/glp-llama1b-d12.yaml MESH_FSDP=1 launch/gpu_node.sh
source "$(dirname "$0")/common.sh"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG:?}" .yaml)}"
mapfile -t ARGS < <(train_args "$RUN_NAME")
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
run_retrying env XLA_PYTHON_CLIENT_MEM_FRACTION="$XLA_PYTHON_CLIENT_MEM_FRACTION" \
  "$GLP" train "${ARGS[@]}" mesh_data=-1 "mesh_fsdp=${MESH_FSDP:-1}" "peak_flops=${PEAK_FLOPS:-989e12}"
