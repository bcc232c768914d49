#!/bin/bash
# A ~1B DeepSeek-V3-architecture proxy on one node (MindSpeed's small DeepSeek-V3 shape): 16 layers (the first
# dense, FFN 2816), hidden 1024, multi-latent attention with 16 heads (q-LoRA 512, KV-LoRA 256, query/key head
# 64 + 32 rotary, value head 64; YaRN factor 40 over 4096 positions), 64 routed SwiGLU experts of width 256 with
# 6 per token plus one shared expert (sigmoid scores with the expert bias, 8 groups of which the best 3 are
# searched, sequence aux loss 1e-4), one multi-token prediction depth (loss weight 0.3), DeepSeek-V3's
# 129280-row vocabulary: 1.09B parameters plus 0.06B in the prediction depth. Layout: 8 GPUs, TP1 PP1 EP8
# (EP may be 1, 2, 4 or 8; PP 1, 2 or 4). Every variable below can be overridden from the environment.
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

STACK=mcore  # MoE layers are built by the mcore stack only
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-ckpt/deepseek3_1b_${STACK}}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-$CKPT_SAVE_DIR}
DATA_PATH=${DATA_PATH:-dataset/deepseek3/wikitext2_text_document}
TOKENIZER_PATH=${TOKENIZER_PATH:-model_from_hf/deepseek_v3}  # DeepSeek-V3's tokenizer
# GPUS_PER_NODE x NNODES = TP x PP x data-parallel size; EP splits the experts over data-parallel ranks.
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}

DISTRIBUTED_ARGS="
    --nproc-per-node $GPUS_PER_NODE \
    --nnodes $NNODES \
    --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR \
    --master-port $MASTER_PORT
"

# DeepSeek-V3's tokenizer padded to a multiple of 3232 x TP keeps the checkpoint's 129280 embedding rows.
GPT_ARGS="
    --use-${STACK}-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --expert-tensor-parallel-size 1 \
    --num-layers 16 \
    --hidden-size 1024 \
    --ffn-hidden-size 2816 \
    --num-attention-heads 16 \
    --multi-latent-attention \
    --q-lora-rank 512 \
    --kv-lora-rank 256 \
    --qk-head-dim 64 \
    --qk-pos-emb-head-dim 32 \
    --v-head-dim 64 \
    --qk-layernorm \
    --rope-type yarn \
    --rotary-scaling-factor 40 \
    --original-max-position-embeddings 4096 \
    --beta-fast 32 \
    --beta-slow 1 \
    --mscale 1.0 \
    --mscale-all-dim 1.0 \
    --untie-embeddings-and-output-weights \
    --num-experts 64 \
    --first-k-dense-replace 1 \
    --moe-router-topk 6 \
    --moe-ffn-hidden-size 256 \
    --moe-shared-expert-intermediate-size 256 \
    --moe-router-score-function sigmoid \
    --moe-router-enable-expert-bias \
    --moe-router-bias-update-rate 1e-3 \
    --moe-router-num-groups 8 \
    --moe-router-group-topk 3 \
    --moe-router-topk-scaling-factor 1.0 \
    --moe-router-dtype fp32 \
    --moe-router-load-balancing-type seq_aux_loss \
    --moe-aux-loss-coeff 1e-4 \
    --moe-token-dispatcher-type alltoall \
    --moe-grouped-gemm \
    --mtp-num-layers 1 \
    --mtp-loss-scaling-factor 0.3 \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path ${TOKENIZER_PATH} \
    --seq-length 4096 \
    --max-position-embeddings 163840 \
    --micro-batch-size 1 \
    --global-batch-size ${GLOBAL_BATCH_SIZE:-256} \
    --make-vocab-size-divisible-by 3232 \
    --position-embedding-type rope \
    --rotary-base 10000 \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --swiglu \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --init-method-std 0.006 \
    --use-flash-attn \
    --attention-softmax-in-fp32 \
    --lr 4.2e-4 \
    --min-lr 4.2e-5 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.01 \
    --train-iters ${TRAIN_ITERS:-5000} \
    --weight-decay 1e-1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --adam-eps 1e-8 \
    --use-distributed-optimizer \
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
    | tee "$LOG_DIR"/pretrain_deepseek3_1b_${STACK}.log
