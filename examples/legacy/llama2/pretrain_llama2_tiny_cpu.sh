#!/bin/bash
# The tiny llama2 CPU run on the legacy stack (--use-legacy-models):
# examples/mcore/llama2/pretrain_llama2_tiny_cpu.sh with STACK=legacy, the same shapes and variables (override
# any of them from the environment).
STACK=legacy exec bash "$(dirname "$0")/../../mcore/llama2/pretrain_llama2_tiny_cpu.sh" "$@"
