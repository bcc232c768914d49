#!/bin/bash
# Tokenize a corpus for deepseek3 pretraining: INPUT (jsonl / parquet / txt, a file, glob or folder) ->
# ${OUTPUT_PREFIX}_text_document.bin/.idx, with the Hugging Face tokenizer in TOKENIZER_PATH (or any
# tokenizer given as TOKENIZER_ARGS). Train with DATA_PATH=${OUTPUT_PREFIX}_text_document.
set -euo pipefail
cd "$(dirname "$0")/../../.."

INPUT=${INPUT:-dataset/wikitext-2/train.jsonl}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-dataset/deepseek3/wikitext2}
TOKENIZER_PATH=${TOKENIZER_PATH:-model_from_hf/deepseek_v3}
TOKENIZER_ARGS=${TOKENIZER_ARGS:-"--tokenizer-type PretrainedFromHF --tokenizer-name-or-path $TOKENIZER_PATH"}
WORKERS=${WORKERS:-4}

mkdir -p "$(dirname "$OUTPUT_PREFIX")"
python tools/preprocess_data.py \
    --input "$INPUT" \
    --json-keys text \
    --output-prefix "$OUTPUT_PREFIX" \
    $TOKENIZER_ARGS \
    --append-eod \
    --workers "$WORKERS" \
    --log-interval 1000
