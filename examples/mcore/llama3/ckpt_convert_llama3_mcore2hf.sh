#!/bin/bash
# Convert a torch-format mcore llama3 checkpoint (any tensor/pipeline layout, e.g. a --save folder) into a
# Hugging Face model folder (config.json + model.safetensors) that transformers loads.
# Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-ckpt/llama3_8b_mcore}
SAVE_DIR=${SAVE_DIR:-model_from_mg/llama3_8b_hf}

python tools/checkpoint/convert.py \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf llama3 \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR"
