#!/bin/bash
# The tiny llama3 CPU run on the legacy stack (--use-legacy-models):
# examples/mcore/llama3/pretrain_llama3_tiny_cpu.sh with STACK=legacy, the same shapes and variables (override
# any of them from the environment).
STACK=legacy exec bash "$(dirname "$0")/../../mcore/llama3/pretrain_llama3_tiny_cpu.sh" "$@"
