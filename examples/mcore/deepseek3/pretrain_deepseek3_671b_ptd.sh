#!/bin/bash
# DeepSeek-V3 671B pretraining on the mcore stack with the published shapes: 61 layers (the first 3 dense,
# FFN 18432), hidden 7168, multi-latent attention with 128 heads (q-LoRA 1536, KV-LoRA 512, query/key head
# 128 + 64 rotary, value head 128; YaRN factor 40 over 4096 positions, mscale 1), 256 routed SwiGLU experts of
# width 2048 with 8 per token plus one shared expert (sigmoid scores with the aux-loss-free expert bias, 8
# groups of which the best 4 are searched, weights scaled by 2.5, sequence aux loss 1e-4), RMSNorm eps 1e-6,
# untied embeddings, 129280-row vocabulary: 671B parameters, 37B active per token; one multi-token prediction
# depth (loss weight 0.3) on the last pipeline stage. Layout as MindSpeed-LLM's A2 script: 64 nodes x 8 GPUs,
# TP4 PP8 EP32 (experts unsplit by TP: --expert-tensor-parallel-size 1), the 61 layers split 7 / 8 x 6 / 6 over
# the stages. Start it on every node with NODE_RANK set (0 .. NNODES-1) and MASTER_ADDR the address of node 0;
# every variable below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# shellcheck disable=SC1091
. scripts/fast_allocator.sh

export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-64}
NODE_RANK=${NODE_RANK:-0}
# Nodes without a shared file system: NO_SHARED_STORAGE=1 builds the dataset index cache on every node.
NO_SHARED_STORAGE=${NO_SHARED_STORAGE:-0}

STACK=mcore  # MoE layers are built by the mcore stack only
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-ckpt/deepseek3_671b_${STACK}}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-$CKPT_SAVE_DIR}
DATA_PATH=${DATA_PATH:-dataset/deepseek3/wikitext2_text_document}
TOKENIZER_PATH=${TOKENIZER_PATH:-model_from_hf/deepseek_v3}
# GPUS_PER_NODE x NNODES = TP x PP x data-parallel size; the experts are laid out over PP x EP x expert
# data-parallel ranks (Megatron's expert folding).
TP=${TP:-4}
PP=${PP:-8}
EP=${EP:-32}
# The 61 layers over the pipeline stages: FIRST_STAGE_LAYERS on the first, LAST_STAGE_LAYERS on the last, the
# others split the rest evenly (PP=8: 8 each).
FIRST_STAGE_LAYERS=${FIRST_STAGE_LAYERS:-7}
LAST_STAGE_LAYERS=${LAST_STAGE_LAYERS:-6}
PIPELINE_SPLIT=""
if [ "$PP" -gt 1 ]; then
    PIPELINE_SPLIT="--decoder-first-pipeline-num-layers $FIRST_STAGE_LAYERS --decoder-last-pipeline-num-layers $LAST_STAGE_LAYERS"
fi
# Sequence parallelism splits the activations between attention and MLP over the tensor-parallel ranks.
SEQUENCE_PARALLEL=""
if [ "$TP" -gt 1 ]; then SEQUENCE_PARALLEL=--sequence-parallel; fi

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
    ${PIPELINE_SPLIT} \
    --expert-model-parallel-size ${EP} \
    --expert-tensor-parallel-size 1 \
    ${SEQUENCE_PARALLEL} \
    --num-layers 61 \
    --hidden-size 7168 \
    --ffn-hidden-size 18432 \
    --num-attention-heads 128 \
    --multi-latent-attention \
    --q-lora-rank 1536 \
    --kv-lora-rank 512 \
    --qk-head-dim 128 \
    --qk-pos-emb-head-dim 64 \
    --v-head-dim 128 \
    --qk-layernorm \
    --rope-type yarn \
    --rotary-scaling-factor 40 \
    --original-max-position-embeddings 4096 \
    --beta-fast 32 \
    --beta-slow 1 \
    --mscale 1.0 \
    --mscale-all-dim 1.0 \
    --untie-embeddings-and-output-weights \
    --num-experts 256 \
    --first-k-dense-replace 3 \
    --moe-router-topk 8 \
    --moe-ffn-hidden-size 2048 \
    --moe-shared-expert-intermediate-size 2048 \
    --moe-router-score-function sigmoid \
    --moe-router-enable-expert-bias \
    --moe-router-bias-update-rate 1e-3 \
    --moe-router-num-groups 8 \
    --moe-router-group-topk 4 \
    --moe-router-topk-scaling-factor 2.5 \
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
    --global-batch-size ${GLOBAL_BATCH_SIZE:-1024} \
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
    --lr 2.2e-4 \
    --min-lr 2.2e-5 \
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
    | tee "$LOG_DIR"/pretrain_deepseek3_671b_${STACK}.log
