#!/bin/bash
# Re-shard a Megatron checkpoint (torch or torch_dist format, any model, either stack, any tensor/pipeline
# layout, e.g. a --save folder) to another layout, e.g. the TP=8 PP=1 checkpoint of a 7B run to TP=1 PP=2:
#   LOAD_DIR=ckpt/llama2_7b_mcore SAVE_DIR=ckpt/llama2_7b_tp1_pp2 TP=1 PP=2 bash examples/ckpt_reshard.sh
# The model weights are re-sharded (optimizer state is not carried over): train from the result with
#   --load $SAVE_DIR --finetune   (or --no-load-optim --no-load-rng)
# STACK=legacy / STACK=mcore also moves it to that stack (by default it keeps its own).
# CKPT_FORMAT=torch_dist writes Megatron's distributed checkpoint instead (loads at any layout with
# --ckpt-format torch_dist).
set -euo pipefail
cd "$(dirname "$0")/.."

LOAD_DIR=${LOAD_DIR:?set LOAD_DIR to the checkpoint to re-shard}
SAVE_DIR=${SAVE_DIR:?set SAVE_DIR to where the re-sharded checkpoint goes}
TP=${TP:-1}
PP=${PP:-1}

python tools/checkpoint/convert.py \
    --load-model-type mg \
    --save-model-type mg \
    --load-dir "$LOAD_DIR" \
    --save-dir "$SAVE_DIR" \
    ${CKPT_FORMAT:+--save-ckpt-format "$CKPT_FORMAT"} \
    --target-tensor-parallel-size "$TP" \
    --target-pipeline-parallel-size "$PP" \
    ${STACK:+--use-${STACK}-models}
