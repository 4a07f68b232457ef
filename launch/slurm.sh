#!/usr/bin/env bash
# Multi-node GPU training through SLURM: one task per node, every GPU of each node;
# jax.distributed.initialize() reads the job from SLURM's environment.
#   CONFIG=experiments/paper/glp-llama8b-d6.yaml NODES=4 GPUS_PER_NODE=8 launch/slurm.sh
source "$(dirname "$0")/common.sh"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG:?}" .yaml)}"
NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
mapfile -t ARGS < <(train_args "$RUN_NAME")
INNER=$(printf '%q ' "$GLP" train "${ARGS[@]}" mesh_data=-1 "mesh_fsdp=${MESH_FSDP:-1}" \
  "peak_flops=${PEAK_FLOPS:-989e12}")
INNER="${INNER% }"
run sbatch --job-name="glp-${RUN_NAME//\//-}" --nodes="$NODES" --ntasks-per-node=1 \
  --gpus-per-node="$GPUS_PER_NODE" --time="${TIME_LIMIT:-7-00:00:00}" \
  ${PARTITION:+--partition="$PARTITION"} --output="${LOG_DIR:-logs}/%x-%j.out" \
  --wrap="srun $INNER"
