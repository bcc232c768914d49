#!/bin/bash
# The tiny qwen3 CPU run on the legacy stack (--use-legacy-models):
# examples/mcore/qwen3/pretrain_qwen3_tiny_cpu.sh with STACK=legacy, the same shapes and variables (override
# any of them from the environment).
STACK=legacy exec bash "$(dirname "$0")/../../mcore/qwen3/pretrain_qwen3_tiny_cpu.sh" "$@"
