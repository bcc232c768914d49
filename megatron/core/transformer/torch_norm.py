"""LayerNorm / RMSNorm chosen by `config.normalization`, on torch's fused kernels."""

import torch

from megatron.core.fusions.compiled import CompiledRMSNorm
from megatron.core.tensor_parallel.layers import parameter_device
from megatron.core.transformer.transformer_config import TransformerConfig


def _mark_sequence_parallel(module: torch.nn.Module, config: TransformerConfig) -> None:
    # Replicated over tensor-parallel ranks; with sequence parallelism each rank normalises only part of
    # the sequence, so these gradients must be all-reduced over those ranks.
    for param in module.parameters():
        param.sequence_parallel = config.sequence_parallel


def build_head_norm(config: TransformerConfig, head_dim: int) -> torch.nn.Module:
    """The per-head query/key norm (qk-layernorm): one weight shared by every head. Each tensor-parallel
    rank normalises only its own heads, so the gradient there is partial: `tensor_parallel_partial_grad`
    asks for it to be summed over the tensor-parallel group after the backward pass."""
    norm = WrappedTorchNorm(config, head_dim)
    for param in norm.parameters():
        param.tensor_parallel_partial_grad = True
    return norm


class WrappedTorchNorm:
    """Builds torch.nn.LayerNorm or torch.nn.RMSNorm (state-dict keys `weight` and, for LayerNorm, `bias`); the
    RMSNorm compiled under `config.torch_compile_fusions`."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = None):
        eps = config.layernorm_epsilon if eps is None else eps
        device = parameter_device(config)
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype, device=device)
        else:
            rms_norm = CompiledRMSNorm if config.torch_compile_fusions else torch.nn.RMSNorm
            norm = rms_norm(hidden_size, eps=eps, dtype=config.params_dtype, device=device)
        _mark_sequence_parallel(norm, config)
        return norm
