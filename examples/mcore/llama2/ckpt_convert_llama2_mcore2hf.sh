#!/bin/bash
# Convert a torch-format mcore llama2 checkpoint (any tensor/pipeline layout, e.g. a --save folder) into a
# Hugging Face model folder (config.json + model.safetensors) that transformers loads.
# Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-ckpt/llama2_7b_mcore}
SAVE_DIR=${SAVE_DIR:-model_from_mg/llama2_7b_hf}

python tools/checkpoint/convert.py \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf llama2 \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR"
