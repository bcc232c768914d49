"""Global gradient norm, clipping and zero counting, reduced over the ranks that hold distinct shards."""

from typing import List

import torch
import torch.distributed as dist

from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate


def _all_reduce(value: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(value, op=op, group=group)
    return value


def get_grad_norm_fp32(
    grads_for_norm: List[torch.Tensor], norm_type: float = 2.0, grad_stats_parallel_group=None
) -> float:
    """The norm of all gradients together, computed in fp32 and summed over `grad_stats_parallel_group`.

    `grads_for_norm` must hold each distinct gradient shard once (no tensor-parallel duplicates).
    """
    device = grads_for_norm[0].device if grads_for_norm else torch.device("cpu")
    if norm_type == float("inf"):
        local = max((grad.detach().abs().max().float() for grad in grads_for_norm), default=None)
        total = torch.zeros(1, device=device) if local is None else local.reshape(1)
        return _all_reduce(total, grad_stats_parallel_group, dist.ReduceOp.MAX).item()
    total = torch.zeros(1, dtype=torch.float32, device=device)
    for grad in grads_for_norm:
        total += torch.linalg.vector_norm(grad.detach(), ord=norm_type, dtype=torch.float32) ** norm_type
    total = _all_reduce(total, grad_stats_parallel_group)
    return total.item() ** (1.0 / norm_type)


def get_grad_norm_over_groups(grads_and_groups: List[tuple], norm_type: float = 2.0) -> float:
    """One global norm of gradient sets whose statistics sum over different groups: [(grads, group), ...]
    (dense gradients over model-parallel ranks, routed experts' over the expert-model-parallel ranks too)."""
    norms = [get_grad_norm_fp32(grads, norm_type, group) for grads, group in grads_and_groups]
    if norm_type == float("inf"):
        return max(norms)
    return sum(norm**norm_type for norm in norms) ** (1.0 / norm_type)


def clip_grad_by_total_norm_fp32(parameters: List[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale every gradient by max_norm / total_norm when the total norm exceeds max_norm."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    grads = [param.grad.detach() for param in parameters if param.grad is not None]
    if grads:
        torch._foreach_mul_(grads, clip_coeff)


def count_zeros_fp32(grads_for_norm: List[torch.Tensor], grad_stats_parallel_group=None) -> int:
    """Number of exactly-zero gradient entries over all distinct shards."""
    device = grads_for_norm[0].device if grads_for_norm else torch.device("cpu")
    zeros = torch.zeros(1, dtype=torch.float64, device=device)
    for grad in grads_for_norm:
        zeros += grad.numel() - torch.count_nonzero(grad)
    return int(_all_reduce(zeros, grad_stats_parallel_group).item())


def grads_for_norm(params: List[torch.nn.Parameter]) -> List[torch.Tensor]:
    """The gradients that count towards the global norm: each distinct one once.

    A parameter marked `shared` (an embedding tied to a later pipeline stage) is counted on its owner only.
    """
    grads = []
    for param in params:
        if param.grad is None:
            continue
        if getattr(param, "shared", False):
            continue
        if param_is_not_tensor_parallel_duplicate(param):
            grads.append(param.grad.detach())
    return grads
