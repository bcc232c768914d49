#!/bin/bash
# Tokenize a corpus for Llama-2 pretraining: INPUT (jsonl / parquet / txt, a file, glob or folder) ->
# ${OUTPUT_PREFIX}_text_document.bin/.idx, with the Llama-2 SentencePiece model
# (or any tokenizer given as TOKENIZER_ARGS). Train with
# DATA_PATH=${OUTPUT_PREFIX}_text_document. Override any variable from the environment.
set -euo pipefail
cd "$(dirname "$0")/../../.."

INPUT=${INPUT:-dataset/wikitext-2/train.jsonl}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-dataset/llama2/wikitext2}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-model_from_hf/llama2_7b/tokenizer.model}
TOKENIZER_ARGS=${TOKENIZER_ARGS:-"--tokenizer-type Llama2Tokenizer --tokenizer-model $TOKENIZER_MODEL"}
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
