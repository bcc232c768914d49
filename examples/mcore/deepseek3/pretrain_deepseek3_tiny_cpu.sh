#!/bin/bash
# A tiny DeepSeek-V3-architecture model that really trains on a CPU: multi-latent attention (q-LoRA, latent
# norms, YaRN RoPE with mscale), a dense first layer, then 8 SwiGLU experts in 4 groups (top-4 of the best 2
# groups, sigmoid scores with the aux-loss-free expert bias, scaled by 2.5) plus a shared expert, the sequence
# aux loss and one multi-token prediction depth (--first-k-dense-replace 1 is Megatron's --moe-layer-freq
# "([0]*1+[1]*1)"); 2 processes over gloo with the experts split over them (EP=2),
# WikiText-2 from ../shared, a few minutes. The GPT-2 BPE files in data/tokenizers stand in for DeepSeek's
# tokenizer (TOKENIZER_PATH selects a real one). Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."
# shellcheck disable=SC1091
. scripts/fast_allocator.sh

SHARED_DIR=${SHARED_DIR:-../shared}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
# Layout: NPROC_PER_NODE x NNODES = TP x PP x data-parallel size; EP (experts split over data-parallel ranks)
# divides the data-parallel size: the default is EP=2 over the 2 processes (PP=2 EP=1 puts the MoE layer and
# the prediction depth on the second stage).
TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-2}
# Nodes without a shared file system: NO_SHARED_STORAGE=1 builds the dataset index cache on every node.
NO_SHARED_STORAGE=${NO_SHARED_STORAGE:-0}

STACK=mcore  # MoE layers are built by the mcore stack only
WORK_DIR=${WORK_DIR:-work_dirs/deepseek3_tiny_cpu_${STACK}}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-$WORK_DIR/ckpt}
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-$CKPT_SAVE_DIR}
if [ -n "${TOKENIZER_PATH:-}" ]; then
    TOKENIZER_ARGS="--tokenizer-type PretrainedFromHF --tokenizer-name-or-path $TOKENIZER_PATH"
else
    TOKENIZER_ARGS="--tokenizer-type GPT2BPETokenizer --vocab-file data/tokenizers/gpt2/vocab.json --merge-file data/tokenizers/gpt2/merges.txt"
fi
DATA_PATH=${DATA_PATH:-work_dirs/data/wikitext2_gpt2_text_document}
TRAIN_ITERS=${TRAIN_ITERS:-200}

if [ ! -f "${DATA_PATH}.idx" ]; then
    INPUT=${INPUT:-$SHARED_DIR/data/wikitext-2/valid.txt} OUTPUT_PREFIX=${DATA_PATH%_text_document} \
        TOKENIZER_ARGS="$TOKENIZER_ARGS" WORKERS=${WORKERS:-2} bash examples/mcore/deepseek3/data_convert_deepseek3_pretrain.sh
fi

DISTRIBUTED_ARGS="
    --nproc-per-node $NPROC_PER_NODE \
    --nnodes $NNODES \
    --node-rank $NODE_RANK \
    --master-addr $MASTER_ADDR \
    --master-port $MASTER_PORT
"

GPT_ARGS="
    --use-${STACK}-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --num-layers 2 \
    --hidden-size 128 \
    --ffn-hidden-size 352 \
    --num-attention-heads 4 \
    --multi-latent-attention \
    --q-lora-rank 64 \
    --kv-lora-rank 32 \
    --qk-head-dim 32 \
    --qk-pos-emb-head-dim 16 \
    --v-head-dim 32 \
    --qk-layernorm \
    --rope-type yarn \
    --rotary-scaling-factor 40 \
    --mscale 1.0 \
    --mscale-all-dim 1.0 \
    --untie-embeddings-and-output-weights \
    --num-experts 8 \
    --first-k-dense-replace 1 \
    --moe-router-topk 4 \
    --moe-ffn-hidden-size 64 \
    --moe-shared-expert-intermediate-size 64 \
    --moe-router-score-function sigmoid \
    --moe-router-enable-expert-bias \
    --moe-router-bias-update-rate 1e-3 \
    --moe-router-num-groups 4 \
    --moe-router-group-topk 2 \
    --moe-router-topk-scaling-factor 2.5 \
    --moe-router-dtype fp32 \
    --moe-router-load-balancing-type seq_aux_loss \
    --moe-aux-loss-coeff 1e-4 \
    --moe-token-dispatcher-type alltoall \
    --mtp-num-layers 1 \
    --mtp-loss-scaling-factor 0.3 \
    $TOKENIZER_ARGS \
    --seq-length 128 \
    --max-position-embeddings 128 \
    --micro-batch-size 4 \
    --global-batch-size 16 \
    --make-vocab-size-divisible-by 128 \
    --position-embedding-type rope \
    --rotary-base 10000 \
    --normalization RMSNorm \
    --norm-epsilon 1e-6 \
    --swiglu \
    --disable-bias-linear \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --init-method-std 0.02 \
    --lr 3.0e-3 \
    --min-lr 3.0e-4 \
    --lr-decay-style cosine \
    --lr-warmup-iters $((TRAIN_ITERS / 20)) \
    --train-iters ${TRAIN_ITERS} \
    --weight-decay 1e-1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --adam-eps 1e-8
"

DATA_ARGS="
    --data-path $DATA_PATH \
    --split 98,1,1
"

OUTPUT_ARGS="
    --log-interval ${LOG_INTERVAL:-10} \
    --save-interval ${SAVE_INTERVAL:-100} \
    --eval-interval ${EVAL_INTERVAL:-100} \
    --eval-iters 2 \
    --exit-signal-handler \
    --tensorboard-dir ${WORK_DIR}/tensorboard
"

LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS pretrain_gpt.py \
    $GPT_ARGS \
    $DATA_ARGS \
    $OUTPUT_ARGS \
    --device cpu \
    --use-cpu-initialization \
    --distributed-backend gloo \
    $([ "$NO_SHARED_STORAGE" = 1 ] && echo --no-shared-storage) \
    --load $CKPT_LOAD_DIR \
    --save $CKPT_SAVE_DIR \
    | tee "$LOG_DIR"/pretrain_deepseek3_tiny_cpu_${STACK}.log
