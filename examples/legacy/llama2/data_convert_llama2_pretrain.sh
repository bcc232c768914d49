#!/bin/bash
# Data are the same for both stacks: this runs examples/mcore/llama2/data_convert_llama2_pretrain.sh.
exec bash "$(dirname "$0")/../../mcore/llama2/data_convert_llama2_pretrain.sh" "$@"
