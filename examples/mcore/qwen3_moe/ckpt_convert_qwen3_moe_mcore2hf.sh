#!/bin/bash
# Convert a torch-format mcore qwen3_moe checkpoint (any tensor/pipeline/expert layout, e.g. a --save folder) into a
# Hugging Face model folder (config.json + model.safetensors) that transformers loads.
# Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-ckpt/qwen3_30b_a3b_mcore}
SAVE_DIR=${SAVE_DIR:-model_from_mg/qwen3_30b_a3b_hf}

python tools/checkpoint/convert.py \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf qwen3_moe \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR"
