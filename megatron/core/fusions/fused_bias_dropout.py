"""residual + dropout(x + bias): the tail of every attention and MLP sub-block."""

import torch
import torch.nn.functional as F


def bias_dropout_add(x_with_bias, residual: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    x, bias = x_with_bias
    if bias is not None:
        x = x + bias
    if training and prob > 0.0:
        x = F.dropout(x, p=prob, training=True)
    return residual + x
