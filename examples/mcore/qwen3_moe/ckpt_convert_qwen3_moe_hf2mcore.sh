#!/bin/bash
# Convert a Hugging Face qwen3_moe model (config.json + safetensors or pytorch_model.bin) into a torch-format
# mcore checkpoint at a chosen tensor/pipeline/expert layout. Train from it with
#   --load $SAVE_DIR --finetune   (or --no-load-optim --no-load-rng)
# Override any variable from the environment.
# CKPT_FORMAT=torch_dist writes Megatron's distributed checkpoint instead (loads at any layout with
# --ckpt-format torch_dist).
set -euo pipefail
cd "$(dirname "$0")/../../.."

LOAD_DIR=${LOAD_DIR:-model_from_hf/qwen3_30b_a3b}
SAVE_DIR=${SAVE_DIR:-model_weights/qwen3_30b_a3b_mcore_tp${TP:-1}_pp${PP:-1}_ep${EP:-1}}
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-1}

python tools/checkpoint/convert.py \
    --load-model-type hf \
    --save-model-type mg \
    --model-type-hf qwen3_moe \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR" \
    ${CKPT_FORMAT:+--save-ckpt-format "$CKPT_FORMAT"} \
    --target-tensor-parallel-size "$TP" \
    --target-pipeline-parallel-size "$PP" \
    --target-expert-parallel-size "$EP" \
    --use-mcore-models
