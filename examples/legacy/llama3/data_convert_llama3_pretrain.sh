#!/bin/bash
# Data are the same for both stacks: this runs examples/mcore/llama3/data_convert_llama3_pretrain.sh.
exec bash "$(dirname "$0")/../../mcore/llama3/data_convert_llama3_pretrain.sh" "$@"
