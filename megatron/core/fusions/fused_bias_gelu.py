"""Bias + GeLU in Megatron's fused form: the tanh approximation (GPT-2's "gelu_new")."""

import math

import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), what Megatron's bias-GeLU fusion computes."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def bias_gelu(bias, y: torch.Tensor) -> torch.Tensor:
    return tanh_gelu(y if bias is None else y + bias)
