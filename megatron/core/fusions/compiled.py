"""torch.compile for the small elementwise functions around the matmuls (RMSNorm, the gated MLP activation,
RoPE): Inductor turns each one's forward and backward into a few fused loops (C++/OpenMP on CPU, Triton on
GPU) instead of one pass over memory per op. Opt-in (`torch_compile_fusions`), since the first step of each
new shape pays the compile time (about 20-30 s on a 2-core CPU)."""

import functools
from typing import Callable

import torch


@functools.cache
def compiled(function: Callable) -> Callable:
    """`function` compiled once per process; shapes that change after the first compile are traced dynamically
    rather than recompiled each time."""
    return torch.compile(function)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)


class CompiledRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm (same parameters and state-dict keys) whose forward and backward are compiled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return compiled(rms_norm)(x, self.weight, self.eps)
