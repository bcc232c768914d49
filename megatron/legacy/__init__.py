"""The legacy (monolithic) model stack, built on megatron.core's tensor-parallel layers and kernels."""
