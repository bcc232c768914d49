"""The autograd-aware collectives that move activations into and out of tensor-parallel regions.

Each forward collective has its adjoint as backward (identity <-> all-reduce, split <-> all-gather,
all-gather <-> reduce-scatter), so gradients come out right on every rank. With one tensor-parallel rank
(or no process group at all) every function returns its input unchanged.
"""

import torch

from megatron.core import parallel_state
from megatron.core.utils import all_gather_single, reduce_scatter_single


def _group_or_default(group):
    return parallel_state.get_tensor_model_parallel_group() if group is None else group


def _size(group) -> int:
    if group is None:
        return parallel_state.get_tensor_model_parallel_world_size()
    return torch.distributed.get_world_size(group=group)


def _all_reduce(input_, group):
    if _size(group) == 1:
        return input_
    input_ = input_.contiguous()
    torch.distributed.all_reduce(input_, group=_group_or_default(group))
    return input_


def _split_along_last_dim(input_, group):
    world_size = _size(group)
    if world_size == 1:
        return input_
    rank = torch.distributed.get_rank(group=_group_or_default(group))
    return torch.chunk(input_, world_size, dim=-1)[rank].contiguous()


def _split_along_first_dim(input_, group):
    world_size = _size(group)
    if world_size == 1:
        return input_
    if input_.size(0) % world_size:
        raise ValueError(
            f"sequence length {input_.size(0)} is not divisible by the tensor-parallel size {world_size} "
            "(sequence parallelism shards the sequence evenly)"
        )
    rank = torch.distributed.get_rank(group=_group_or_default(group))
    return torch.chunk(input_, world_size, dim=0)[rank].contiguous()


def _gather_along_last_dim(input_, group):
    world_size = _size(group)
    if world_size == 1:
        return input_
    stacked = _gather_along_first_dim(input_, group)
    return torch.cat(torch.chunk(stacked, world_size, dim=0), dim=-1).contiguous()


def _gather_along_first_dim(input_, group):
    world_size = _size(group)
    if world_size == 1:
        return input_
    shape = (world_size * input_.size(0),) + tuple(input_.shape[1:])
    output = torch.empty(shape, dtype=input_.dtype, device=input_.device)
    all_gather_single(output, input_.contiguous(), group=_group_or_default(group))
    return output


def _reduce_scatter_along_first_dim(input_, group):
    world_size = _size(group)
    if world_size == 1:
        return input_
    if input_.size(0) % world_size:
        raise ValueError(
            f"sequence length {input_.size(0)} is not divisible by the tensor-parallel size {world_size}"
        )
    shape = (input_.size(0) // world_size,) + tuple(input_.shape[1:])
    output = torch.empty(shape, dtype=input_.dtype, device=input_.device)
    reduce_scatter_single(output, input_.contiguous(), group=_group_or_default(group))
    return output


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return _all_reduce(grad_output, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        return _all_reduce(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_along_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_last_dim(grad_output, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _gather_along_last_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _split_along_last_dim(grad_output, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_along_first_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, tensor_parallel_output_grad, group):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_first_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        # A consumer that is itself tensor-parallel produced partial gradients: sum them while scattering.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad_output, ctx.group), None, None
        return _split_along_first_dim(grad_output, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _reduce_scatter_along_first_dim(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_along_first_dim(grad_output, ctx.group), None


def copy_to_tensor_model_parallel_region(input_, group=None):
    """Identity forward; all-reduce of the gradient (the input feeds every rank's shard)."""
    return _CopyToModelParallelRegion.apply(input_, group)


def reduce_from_tensor_model_parallel_region(input_, group=None):
    """All-reduce forward (sum the ranks' partial results); identity backward."""
    return _ReduceFromModelParallelRegion.apply(input_, group)


def scatter_to_tensor_model_parallel_region(input_, group=None):
    """Keep this rank's slice of the last dimension; all-gather the gradient."""
    return _ScatterToModelParallelRegion.apply(input_, group)


def gather_from_tensor_model_parallel_region(input_, group=None):
    """All-gather along the last dimension; keep this rank's slice of the gradient."""
    return _GatherFromModelParallelRegion.apply(input_, group)


def scatter_to_sequence_parallel_region(input_, group=None):
    """Keep this rank's slice of the sequence (first) dimension; all-gather the gradient."""
    return _ScatterToSequenceParallelRegion.apply(input_, group)


def gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=None):
    """All-gather along the sequence; reduce-scatter the gradient (or split it when the consumer is
    replicated rather than tensor-parallel)."""
    return _GatherFromSequenceParallelRegion.apply(input_, tensor_parallel_output_grad, group)


def reduce_scatter_to_sequence_parallel_region(input_, group=None):
    """Sum the ranks' partial results and keep this rank's slice of the sequence; all-gather the gradient."""
    return _ReduceScatterToSequenceParallelRegion.apply(input_, group)
