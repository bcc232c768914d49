#!/bin/bash
# Convert a Hugging Face llama3 model (config.json + safetensors or pytorch_model.bin) into a torch-format
# mcore checkpoint at a chosen tensor/pipeline layout. Train from it with
#   --load $SAVE_DIR --finetune   (or --no-load-optim --no-load-rng)
# Override any variable from the environment.
# CKPT_FORMAT=torch_dist writes Megatron's distributed checkpoint instead (loads at any layout with
# --ckpt-format torch_dist).
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-model_from_hf/llama3_8b}
SAVE_DIR=${SAVE_DIR:-model_weights/llama3_8b_mcore_tp${TP:-1}_pp${PP:-1}}
TP=${TP:-1}
PP=${PP:-1}

python tools/checkpoint/convert.py \
    --load-model-type hf \
    --save-model-type mg \
    --model-type-hf llama3 \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR" \
    ${CKPT_FORMAT:+--save-ckpt-format "$CKPT_FORMAT"} \
    --target-tensor-parallel-size "$TP" \
    --target-pipeline-parallel-size "$PP" \
    --use-mcore-models
