#!/usr/bin/env bash
# The main job on a fresh machine: install, then turn the bundled WikiText-2 sample into a Megatron dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate

DATA_DIR="${DATA_DIR:-work_dirs/quickstart/data}"
python tools/preprocess_data.py \
  --input data/wikitext-2-sample/wiki.valid.sample.txt \
  --output-prefix "$DATA_DIR/wiki" \
  --tokenizer-type GPT2BPETokenizer \
  --vocab-file data/tokenizers/gpt2/vocab.json \
  --merge-file data/tokenizers/gpt2/merges.txt \
  --append-eod \
  --workers 2
echo "dataset: $DATA_DIR/wiki_text_document.bin/.idx (use --data-path $DATA_DIR/wiki_text_document)"
