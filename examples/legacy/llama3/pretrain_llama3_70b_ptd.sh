#!/bin/bash
# Llama-3 70B pretraining on the legacy stack (--use-legacy-models):
# examples/mcore/llama3/pretrain_llama3_70b_ptd.sh with STACK=legacy, the same shapes, layout and variables
# (override any of them from the environment).
STACK=legacy exec bash "$(dirname "$0")/../../mcore/llama3/pretrain_llama3_70b_ptd.sh" "$@"
