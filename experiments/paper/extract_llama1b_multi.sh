#!/usr/bin/env bash
# Data for glp-llama1b-d12-multi: Llama-3.2-1B, all 16 layers in one store (rows aligned
# across layers), FineWeb sample-10BT as for extract_llama1b.sh.
exec env MODEL=meta-llama/Llama-3.2-1B LAYERS=all NAME=llama1b-all-fineweb \
  CORPUS=hf:HuggingFaceFW/fineweb:sample-10BT TRAIN_TOKENS=1024000000 VAL_TOKENS=10000000 \
  "$(dirname "$0")/../../launch/extract.sh"
