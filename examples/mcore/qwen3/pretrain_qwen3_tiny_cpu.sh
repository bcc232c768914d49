#!/bin/bash
# A tiny Qwen3-architecture model (QK-norm, heads wider than hidden / heads, grouped-query attention, RoPE
# base 1000000, RMSNorm, SwiGLU, tied embeddings, no biases) on the mcore stack (STACK=legacy selects the
# legacy stack) that really trains on a CPU: 2 processes over gloo, WikiText-2 from ../shared, a few minutes.
# The same flags as pretrain_qwen3_0point6b_ptd.sh, scaled down; the Qwen3 tokenizer is not bundled, so the
# GPT-2 BPE files in data/tokenizers stand in for it (set TOKENIZER_PATH to a Qwen3 tokenizer folder to use
# the real one). Override any variable from the environment, e.g. TRAIN_ITERS=20 NPROC_PER_NODE=1 bash this.sh
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
# Layout: NPROC_PER_NODE x NNODES = TP x PP x data-parallel size, e.g. TP=2 (tensor parallel over the 2
# processes), PP=2 (two pipeline stages) or the default TP=1 PP=1 (data parallel over 2 processes).
TP=${TP:-1}
PP=${PP:-1}
# Nodes without a shared file system: NO_SHARED_STORAGE=1 builds the dataset index cache on every node.
NO_SHARED_STORAGE=${NO_SHARED_STORAGE:-0}

STACK=${STACK:-mcore}
WORK_DIR=${WORK_DIR:-work_dirs/qwen3_tiny_cpu_${STACK}}
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
        TOKENIZER_ARGS="$TOKENIZER_ARGS" WORKERS=${WORKERS:-2} bash examples/mcore/qwen3/data_convert_qwen3_pretrain.sh
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
    --num-layers 2 \
    --hidden-size 128 \
    --ffn-hidden-size 352 \
    --num-attention-heads 4 \
    --kv-channels 64 \
    --group-query-attention \
    --num-query-groups 2 \
    --qk-layernorm \
    $TOKENIZER_ARGS \
    --seq-length 128 \
    --max-position-embeddings 128 \
    --micro-batch-size 4 \
    --global-batch-size 16 \
    --make-vocab-size-divisible-by 128 \
    --position-embedding-type rope \
    --rotary-base 1000000 \
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
    | tee "$LOG_DIR"/pretrain_qwen3_tiny_cpu_${STACK}.log
