#!/usr/bin/env bash
# A Cloud TPU VM pod slice: install the project on every worker, then start the same
# command on all workers (jax.distributed.initialize() reads the TPU metadata). When the
# workers are told to stop (maintenance: SIGTERM), training checkpoints and exits 75, and
# the command is rerun (RETRY_DELAY_S apart, at most MAX_RETRIES times); it resumes.
#   TPU_NAME=glp-v5p-64 ZONE=us-east5-a CONFIG=experiments/paper/glp-llama1b-d24.yaml \
#   RUN_ROOT=gs://bucket/runs DATA_ROOT=gs://bucket/acts launch/tpu_vm.sh
source "$(dirname "$0")/common.sh"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG:?}" .yaml)}"
TPU_NAME="${TPU_NAME:?set TPU_NAME}"
ZONE="${ZONE:?set ZONE}"
REPO_URL="${REPO_URL:-https://github.com/glp-jax/glp_jax.git}"
REF="${REF:-main}"
SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && SSH+=(--project="$PROJECT")
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  run "${SSH[@]}" --command="set -e; [ -d glp_jax ] || git clone $REPO_URL glp_jax; cd glp_jax && git fetch -q && git checkout -q $REF && make install && .venv/bin/pip install -q 'jax[tpu]'"
fi
mapfile -t ARGS < <(train_args "$RUN_NAME")
INNER=$(printf '%q ' .venv/bin/glp train "${ARGS[@]}" mesh_data=-1 "mesh_fsdp=${MESH_FSDP:-1}" \
  "peak_flops=${PEAK_FLOPS:-459e12}")
INNER="${INNER% }"
run_retrying "${SSH[@]}" --command="cd glp_jax && GLP_RUN_ROOT=$RUN_ROOT GLP_DATA_ROOT=$DATA_ROOT $INNER"
