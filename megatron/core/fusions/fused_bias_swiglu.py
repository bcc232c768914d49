"""Bias + gated linear unit: the MLP's first projection holds [gate; up] and yields act(gate) * up."""

import torch


def bias_gated_activation(y: torch.Tensor, bias, activation) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    gate, up = torch.chunk(y, 2, dim=-1)
    return activation(gate) * up
