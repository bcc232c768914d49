"""Small helpers shared across megatron.core."""

import math

import torch
import torch.distributed

# torch 2.10 renamed the collectives whose output is one tensor and deprecated the old names; use whichever
# this torch has, so older releases (torch.nn.RMSNorm needs 2.4) work and newer ones give no warnings.
all_gather_single = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
reduce_scatter_single = (
    getattr(torch.distributed, "reduce_scatter_single", None) or torch.distributed.reduce_scatter_tensor
)


def divide(numerator: int, denominator: int) -> int:
    """numerator / denominator for sizes that must split evenly (heads over ranks, rows over shards)."""
    if denominator == 0 or numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def init_method_normal(sigma: float):
    """Weight initialiser drawing from N(0, sigma^2)."""

    def init_(tensor):
        return torch.nn.init.normal_(tensor, mean=0.0, std=sigma)

    return init_


def scaled_init_method_normal(sigma: float, num_layers: int):
    """N(0, (sigma / sqrt(2 * num_layers))^2): the output projections feeding each residual add, so the
    residual stream's variance does not grow with depth (GPT-2 / Megatron-LM)."""
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))
