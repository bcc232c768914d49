#!/bin/bash
# Data are the same for both stacks: this runs examples/mcore/qwen3/data_convert_qwen3_pretrain.sh.
exec bash "$(dirname "$0")/../../mcore/qwen3/data_convert_qwen3_pretrain.sh" "$@"
