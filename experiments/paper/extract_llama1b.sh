#!/usr/bin/env bash
# Data for glp-llama1b-d{3,6,12,24}: Llama-3.2-1B base, layer 7 (middlemost), every non-BOS
# token of FineWeb sample-10BT documents (seed-42 permutation; 10,000 held-out documents),
# right-truncated to 2048 tokens, bf16. 1.024B training activations + 10M validation.
# Run on a GPU node with hub access; DATA_ROOT may be a bucket (gs://...).
exec env MODEL=meta-llama/Llama-3.2-1B LAYERS=7 NAME=llama1b-l07-fineweb \
  CORPUS=hf:HuggingFaceFW/fineweb:sample-10BT TRAIN_TOKENS=1024000000 VAL_TOKENS=10000000 \
  "$(dirname "$0")/../../launch/extract.sh"
