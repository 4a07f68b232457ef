#!/usr/bin/env bash
# One process on this machine (CPU, one GPU, or one TPU host). A preempted run (exit 75 after
# SIGTERM) is rerun and resumes, at most MAX_RETRIES times.
#   CONFIG=experiments/cpu/smollm2-l14-d3.yaml RUN_NAME=try OVERRIDES="num_steps=100" launch/local.sh
source "$(dirname "$0")/common.sh"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG:?}" .yaml)}"
mapfile -t ARGS < <(train_args "$RUN_NAME")
run_retrying "$GLP" train "${ARGS[@]}"
