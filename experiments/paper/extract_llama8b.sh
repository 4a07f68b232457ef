#!/usr/bin/env bash
# Data for glp-llama8b-d6: Llama-3.1-8B base, layer 15 (middlemost), FineWeb sample-10BT.
exec env MODEL=meta-llama/Llama-3.1-8B LAYERS=15 NAME=llama8b-l15-fineweb \
  CORPUS=hf:HuggingFaceFW/fineweb:sample-10BT TRAIN_TOKENS=1024000000 VAL_TOKENS=10000000 \
  "$(dirname "$0")/../../launch/extract.sh"
