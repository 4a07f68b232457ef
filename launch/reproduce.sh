#!/usr/bin/env bash
# The paper's six findings end to end on one host (CPU, one GPU, or one TPU host); resumable:
# rerun the same line after a preemption and every finished part is skipped.
#   launch/reproduce.sh                                              # the CPU plan (~2 h, 2 cores)
#   PLAN=experiments/reproduce/paper-llama1b.yaml launch/reproduce.sh  # the paper-scale plan
#   PLAN=... OVERRIDES="root=gs://bucket/repro report_dir=reports/llama1b" launch/reproduce.sh
source "$(dirname "$0")/common.sh"
PLAN="${PLAN:-experiments/reproduce/cpu.yaml}"
# shellcheck disable=SC2206
EXTRA=(${OVERRIDES:-})
run "$GLP" reproduce "config=$PLAN" "${EXTRA[@]}"
