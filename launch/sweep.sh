#!/usr/bin/env bash
# Depths x budgets x seeds on any backend (local, gpu_node, slurm, tpu_vm). Each run is
# one cosine schedule of BUDGET activations; its log-spaced epoch checkpoints give the
# intermediate points of the scaling fit (the paper's method), or give several BUDGETS
# for one run per compute budget.
#   BACKEND=slurm CONFIG=experiments/paper/glp-llama1b-d3.yaml DEPTHS="3 6 12 24" \
#   BUDGETS="1024000000" SEEDS="0" SWEEP=llama1b-l07 launch/sweep.sh
source "$(dirname "$0")/common.sh"
BACKEND="${BACKEND:-local}"
DEPTHS="${DEPTHS:-3 6 12 24}"
BUDGETS="${BUDGETS:-1024000000}"
SEEDS="${SEEDS:-0}"
SWEEP="${SWEEP:-$(basename "${CONFIG:?}" .yaml)}"
BASE_OVERRIDES="${OVERRIDES:-}"
for depth in $DEPTHS; do
  for budget in $BUDGETS; do
    for seed in $SEEDS; do
      RUN_NAME="${SWEEP}/d${depth}-a${budget}-s${seed}" \
      OVERRIDES="${BASE_OVERRIDES} sweep_name=${SWEEP} n_layers=${depth} num_steps=null num_activations=${budget} seed=${seed}" \
      CONFIG="$CONFIG" RUN_ROOT="$RUN_ROOT" DATA_ROOT="$DATA_ROOT" DRY_RUN="${DRY_RUN:-0}" GLP="$GLP" \
        bash "$HERE/${BACKEND}.sh"
    done
  done
done
