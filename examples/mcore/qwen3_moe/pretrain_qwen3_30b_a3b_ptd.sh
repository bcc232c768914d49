#!/bin/bash
# Qwen3-30B-A3B pretraining on the mcore stack with the published shapes: 48 layers, hidden 2048, 32 query
# heads of width 128 in 4 key/value groups, QK-norm, 128 routed SwiGLU experts of width 768 with 8 per token
# (softmax router, renormalised top-k = Qwen's norm_topk_prob true, aux loss 1e-3), RoPE base 1000000, RMSNorm
# eps 1e-6, untied embeddings, 151936-row vocabulary. Layout as MindSpeed-LLM's 2 x 8 script: TP1 PP2 EP8.
# Every variable below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# shellcheck disable=SC1091
. scripts/fast_allocator.sh

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
# Nodes without a shared file system: NO_SHARED_STORAGE=1 builds the dataset index cache on every node.
NO_SHARED_STORAGE=${NO_SHARED_STORAGE:-0}

STACK=mcore  # MoE layers are built by the mcore stack only
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-ckpt/qwen3_30b_a3b_${STACK}}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-$CKPT_SAVE_DIR}
DATA_PATH=${DATA_PATH:-dataset/qwen3_moe/wikitext2_text_document}
TOKENIZER_PATH=${TOKENIZER_PATH:-model_from_hf/qwen3_30b_a3b}
# GPUS_PER_NODE x NNODES = TP x PP x data-parallel size; EP splits the experts over data-parallel ranks.
TP=${TP:-1}
PP=${PP:-2}
EP=${EP:-8}

DISTRIBUTED_ARGS="
    --nproc-per-node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR \
    --master-port $MASTER_PORT
"

# 151669 tokenizer entries padded to a multiple of 1187 give the checkpoint's 151936 embedding rows.
GPT_ARGS="
    --use-${STACK}-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --num-layers 48 \
    --hidden-size 2048 \
    --ffn-hidden-size 6144 \
    --num-attention-heads 32 \
    --kv-channels 128 \
    --group-query-attention \
    --num-query-groups 4 \
    --qk-layernorm \
    --untie-embeddings-and-output-weights \
    --num-experts 128 \
    --moe-router-topk 8 \
    --moe-ffn-hidden-size 768 \
    --moe-router-load-balancing-type aux_loss \
    --moe-aux-loss-coeff 1e-3 \
    --moe-router-dtype fp32 \
    --moe-token-dispatcher-type alltoall \
    --moe-grouped-gemm \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --seq-length 4096 \
    --max-position-embeddings 40960 \
    --micro-batch-size 1 \
    --global-batch-size ${GLOBAL_BATCH_SIZE:-128} \
    --make-vocab-size-divisible-by 1187 \
    --position-embedding-type rope \
    --rotary-base 1000000 \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
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
    | tee "$LOG_DIR"/pretrain_qwen3_30b_a3b_${STACK}.log
