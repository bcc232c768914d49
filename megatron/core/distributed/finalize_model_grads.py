"""The last step of a backward pass: finish every gradient reduction before the optimizer runs."""

from typing import List

import torch


def finalize_model_grads(model: List[torch.nn.Module]) -> None:
    """Complete the data-parallel gradient reduction of each model chunk."""
    for model_chunk in model:
        model_chunk.finish_grad_sync()
