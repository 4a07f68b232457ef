#!/usr/bin/env bash
# Multi-node GPU training through SLURM: one task per node, every GPU of each node;
# jax.distributed.initialize() reads the job from SLURM's environment.
#   CONFIG=experiments/paper/glp-llama8b-d6.yaml NODES=4 GPUS_PER_NODE=8 launch/slurm.sh
# Preemption and time limits: the job is requeueable, SLURM sends SIGTERM to every task
# SIGNAL_LEAD_S seconds before the time limit, training checkpoints and exits 75, and the
# batch script then requeues the job (at most MAX_REQUEUES times); the requeued job resumes.
source "$(dirname "$0")/common.sh"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG:?}" .yaml)}"
NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
SIGNAL_LEAD_S="${SIGNAL_LEAD_S:-120}"
MAX_REQUEUES="${MAX_REQUEUES:-20}"
mapfile -t ARGS < <(train_args "$RUN_NAME")
INNER=$(printf '%q ' "$GLP" train "${ARGS[@]}" mesh_data=-1 "mesh_fsdp=${MESH_FSDP:-1}" \
  "peak_flops=${PEAK_FLOPS:-989e12}")
INNER="${INNER% }"
# Exit 75 = preempted with a checkpoint written: requeue (SLURM_RESTART_COUNT counts requeues).
REQUEUE="s=\$?; if [ \$s -eq $PREEMPTED_EXIT ] && [ \${SLURM_RESTART_COUNT:-0} -lt $MAX_REQUEUES ]; then scontrol requeue \$SLURM_JOB_ID; fi; exit \$s"
run sbatch --job-name="glp-${RUN_NAME//\//-}" --nodes="$NODES" --ntasks-per-node=1 \
  --gpus-per-node="$GPUS_PER_NODE" --time="${TIME_LIMIT:-7-00:00:00}" \
  --requeue --signal="TERM@${SIGNAL_LEAD_S}" --open-mode=append \
  ${PARTITION:+--partition="$PARTITION"} --output="${LOG_DIR:-logs}/%x-%j.out" \
  --wrap="srun $INNER ; $REQUEUE"
