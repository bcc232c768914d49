#!/bin/bash
# Convert a torch-format mcore DeepSeek-V3 checkpoint (any tensor/pipeline/expert layout, e.g. a --save folder) into a
# Hugging Face model folder (config.json + model.safetensors) that transformers loads.
# Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-ckpt/deepseek_v3_mcore}
SAVE_DIR=${SAVE_DIR:-model_from_mg/deepseek_v3_hf}

python tools/checkpoint/convert.py \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf deepseek_v3 \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR"
