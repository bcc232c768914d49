#!/bin/bash
# Qwen3-32B pretraining on the legacy stack (--use-legacy-models):
# examples/mcore/qwen3/pretrain_qwen3_32b_ptd.sh with STACK=legacy, the same shapes, layout and variables
# (override any of them from the environment).
STACK=legacy exec bash "$(dirname "$0")/../../mcore/qwen3/pretrain_qwen3_32b_ptd.sh" "$@"
