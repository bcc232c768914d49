#!/bin/bash
# Llama-2 7B pretraining on the mcore stack (STACK=legacy selects the legacy stack), with the published shapes
# (32 layers, hidden 4096, FFN 11008, 32 heads, 4096 tokens, 32000-piece SentencePiece vocabulary, RoPE,
# RMSNorm, SwiGLU, untied embeddings, no biases). Every variable below can be overridden from the environment,
# e.g. DATA_PATH=/data/llama2_text_document TOKENIZER_MODEL=/models/llama2/tokenizer.model bash this.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
# shellcheck disable=SC1091
. scripts/fast_allocator.sh

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
# Nodes without a shared file system: NO_SHARED_STORAGE=1 builds the dataset index cache on every node.
NO_SHARED_STORAGE=${NO_SHARED_STORAGE:-0}

STACK=${STACK:-mcore}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-ckpt/llama2_7b_${STACK}}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-$CKPT_SAVE_DIR}
DATA_PATH=${DATA_PATH:-dataset/llama2/wikitext2_text_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-model_from_hf/llama2_7b/tokenizer.model}
# GPUS_PER_NODE x NNODES = TP x PP x data-parallel size; the published layout is TP=8 PP=1 (TP=1 PP=2 also fits).
TP=${TP:-8}
PP=${PP:-1}

DISTRIBUTED_ARGS="
    --nproc-per-node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR \
    --master-port $MASTER_PORT
"

GPT_ARGS="
    --use-${STACK}-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --num-layers 32 \
    --hidden-size 4096 \
    --ffn-hidden-size 11008 \
    --num-attention-heads 32 \
    --tokenizer-type Llama2Tokenizer \
    --tokenizer-model ${TOKENIZER_MODEL} \
    --seq-length 4096 \
    --max-position-embeddings 4096 \
    --micro-batch-size 1 \
    --global-batch-size ${GLOBAL_BATCH_SIZE:-256} \
    --make-vocab-size-divisible-by 1 \
    --position-embedding-type rope \
    --rotary-base 10000 \
    --normalization RMSNorm \
    --norm-epsilon 1e-5 \
    --swiglu \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --init-method-std 0.02 \
    --use-flash-attn \
    --attention-softmax-in-fp32 \
    --lr 3.0e-4 \
    --min-lr 3.0e-5 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.01 \
    --train-iters ${TRAIN_ITERS:-5000} \
    --weight-decay 1e-1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --adam-eps 1e-5 \
    --bf16
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 949,50,1
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${SAVE_INTERVAL:-1000} \
    --eval-interval 1000 \
    --eval-iters 10 \
    --exit-signal-handler \
    --tensorboard-dir ${CKPT_SAVE_DIR}/tensorboard
"

LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    $([ "$NO_SHARED_STORAGE" = 1 ] && echo --no-shared-storage) \
    --load $CKPT_LOAD_DIR \
    --save $CKPT_SAVE_DIR \
    | tee "$LOG_DIR"/pretrain_llama2_7b_${STACK}.log
