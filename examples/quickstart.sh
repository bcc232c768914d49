#!/usr/bin/env bash
# The main job on a fresh machine: install, turn the bundled WikiText-2 sample into a Megatron dataset, train
# a small Llama-architecture model (mcore stack) with 2 CPU processes for a few minutes, save a checkpoint and
# print a greedy continuation with tools/generate.py. Override any variable from the environment, e.g.
#   TRAIN_ITERS=50 NPROC_PER_NODE=1 bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# shellcheck disable=SC1091
. scripts/fast_allocator.sh

WORK_DIR="${WORK_DIR:-work_dirs/quickstart}"
DATA_DIR="${DATA_DIR:-$WORK_DIR/data}"
CKPT_DIR="${CKPT_DIR:-$WORK_DIR/checkpoint}"
TENSORBOARD_DIR="${TENSORBOARD_DIR:-$WORK_DIR/tensorboard}"
LOG_FILE="${LOG_FILE:-$WORK_DIR/logs/train.log}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
TRAIN_ITERS="${TRAIN_ITERS:-150}"
PROMPT="${PROMPT:- The game}"
TOKENIZER_ARGS="--tokenizer-type GPT2BPETokenizer --vocab-file data/tokenizers/gpt2/vocab.json --merge-file data/tokenizers/gpt2/merges.txt"

python tools/preprocess_data.py \
  --input data/wikitext-2-sample/wiki.valid.sample.txt \
  --output-prefix "$DATA_DIR/wiki" \
  $TOKENIZER_ARGS \
  --append-eod \
  --workers 2
echo "dataset: $DATA_DIR/wiki_text_document.bin/.idx (use --data-path $DATA_DIR/wiki_text_document)"

# TensorBoard events when the tensorboard package is installed.
TENSORBOARD_ARGS=""
if python -c "import tensorboard" 2>/dev/null; then
  TENSORBOARD_ARGS="--tensorboard-dir $TENSORBOARD_DIR"
fi

mkdir -p "$(dirname "$LOG_FILE")"
torchrun --nproc-per-node "$NPROC_PER_NODE" --master-addr 127.0.0.1 --master-port "${MASTER_PORT:-29511}" \
  pretrain_gpt.py \
  --use-mcore-models \
  --num-layers 4 --hidden-size 128 --ffn-hidden-size 352 --num-attention-heads 4 \
  --group-query-attention --num-query-groups 2 \
  --position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --seq-length 128 --max-position-embeddings 128 \
  $TOKENIZER_ARGS \
  --data-path "$DATA_DIR/wiki_text_document" --split 98,1,1 \
  --micro-batch-size 4 --global-batch-size 16 \
  --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
  --train-iters "$TRAIN_ITERS" --log-interval 10 --eval-interval "$TRAIN_ITERS" --eval-iters 2 \
  --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$TRAIN_ITERS" \
  --device cpu $TENSORBOARD_ARGS \
  | tee "$LOG_FILE"

echo
echo "greedy continuation of \"$PROMPT\":"
python tools/generate.py --load "$CKPT_DIR" --prompt "$PROMPT" --max-new-tokens 32 $TOKENIZER_ARGS --device cpu

echo
echo "training log:      $LOG_FILE"
if [ -n "$TENSORBOARD_ARGS" ]; then
  echo "TensorBoard events: $TENSORBOARD_DIR   (tensorboard --logdir $TENSORBOARD_DIR)"
fi
echo "checkpoint:        $CKPT_DIR   (latest_checkpointed_iteration.txt, iter_*/mp_rank_00/model_optim_rng.pt)"
