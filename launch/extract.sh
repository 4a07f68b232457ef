#!/usr/bin/env bash
# Activation extraction on a GPU node: train and validation stores of one model/layer.
#   MODEL=meta-llama/Llama-3.2-1B LAYERS=7 NAME=llama1b-l07-fineweb \
#   CORPUS=hf:HuggingFaceFW/fineweb:sample-10BT TRAIN_TOKENS=1024000000 launch/extract.sh
source "$(dirname "$0")/common.sh"
MODEL="${MODEL:-smollm2}"
LAYERS="${LAYERS:-middle}"
CORPUS="${CORPUS:-fortune}"
NAME="${NAME:?set NAME (the store folder under DATA_ROOT)}"
DEVICE="${DEVICE:-cuda}"
COMMON=(--model "$MODEL" --layers "$LAYERS" --corpus "$CORPUS" --device "$DEVICE"
        --llm-dtype "${LLM_DTYPE:-bfloat16}" --batch-tokens "${BATCH_TOKENS:-65536}"
        --seed "${SEED:-42}")
run "$GLP" extract "${COMMON[@]}" --split val --max-tokens "${VAL_TOKENS:-10000000}" \
  --out "${DATA_ROOT}/${NAME}/val"
run "$GLP" extract "${COMMON[@]}" --split train --max-tokens "${TRAIN_TOKENS:-1024000000}" \
  --out "${DATA_ROOT}/${NAME}/train"
