#!/bin/bash
# Convert a torch-format mcore mixtral checkpoint (any tensor/pipeline/expert layout, e.g. a --save folder) into a
# Hugging Face model folder (config.json + model.safetensors) that transformers loads.
# Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-ckpt/mixtral_8x7b_mcore}
SAVE_DIR=${SAVE_DIR:-model_from_mg/mixtral_8x7b_hf}

python tools/checkpoint/convert.py \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf mixtral \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR"
