#!/bin/bash
# Mixtral 8x7B pretraining on the mcore stack with the published shapes: 32 layers, hidden 4096, 32 query heads
# in 8 key/value groups, 8 SwiGLU experts of width 14336 with 2 per token (softmax router, aux loss 1e-2 as
# Megatron-LM's example), RoPE base 1000000, RMSNorm eps 1e-5, untied embeddings, 32000-row vocabulary.
# Layout as Megatron-LM's 8 x 8 example: TP1 PP4 EP8. Every variable below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# shellcheck disable=SC1091
. scripts/fast_allocator.sh

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-8}
NODE_RANK=${NODE_RANK:-0}
# Nodes without a shared file system: NO_SHARED_STORAGE=1 builds the dataset index cache on every node.
NO_SHARED_STORAGE=${NO_SHARED_STORAGE:-0}

STACK=mcore  # MoE layers are built by the mcore stack only
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-ckpt/mixtral_8x7b_${STACK}}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-$CKPT_SAVE_DIR}
DATA_PATH=${DATA_PATH:-dataset/mixtral/wikitext2_text_document}
TOKENIZER_PATH=${TOKENIZER_PATH:-model_from_hf/mixtral_8x7b}
# GPUS_PER_NODE x NNODES = TP x PP x data-parallel size; EP splits the experts over data-parallel ranks.
TP=${TP:-1}
PP=${PP:-4}
EP=${EP:-8}

DISTRIBUTED_ARGS="
    --nproc-per-node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR \
    --master-port $MASTER_PORT
"

# Mixtral's 32000-entry tokenizer is its embedding size: no padding beyond a multiple of 128.
GPT_ARGS="
    --use-${STACK}-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --num-layers 32 \
    --hidden-size 4096 \
    --ffn-hidden-size 14336 \
    --num-attention-heads 32 \
    --group-query-attention \
    --num-query-groups 8 \
    --untie-embeddings-and-output-weights \
    --num-experts 8 \
    --moe-router-topk 2 \
    --moe-router-load-balancing-type aux_loss \
    --moe-aux-loss-coeff 1e-2 \
    --moe-token-dispatcher-type alltoall \
    --moe-grouped-gemm \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --seq-length 4096 \
    --max-position-embeddings 32768 \
    --micro-batch-size 1 \
    --global-batch-size ${GLOBAL_BATCH_SIZE:-128} \
    --make-vocab-size-divisible-by 128 \
    --position-embedding-type rope \
    --rotary-base 1000000 \
    --normalization RMSNorm \
    --norm-epsilon 1e-5 \
    --swiglu \
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
    --adam-eps 1e-8 \
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
    | tee "$LOG_DIR"/pretrain_mixtral_8x7b_${STACK}.log
