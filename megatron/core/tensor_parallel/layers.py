"""Tensor-parallel layers: each rank holds a slice of the weight and the collectives make the result
equal to the unsplit layer's.

ColumnParallelLinear splits the output features (rows of the weight), RowParallelLinear the input
features (columns), VocabParallelEmbedding the vocabulary. Every parameter records how it is split
(`tensor_model_parallel`, `partition_dim`, `partition_stride`) for gradient-norm and checkpoint code.
"""

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.tensor_parallel.state_dict_sharding import shard_of
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.utils import divide

def set_tensor_model_parallel_attributes(tensor: torch.Tensor, is_parallel: bool, dim: int, stride: int) -> None:
    """Record how `tensor` is split over tensor-parallel ranks."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor) -> bool:
    """True for a split parameter, or for the rank-0 copy of a replicated one: count each weight once."""
    return getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_rank() == 0


def parameter_device(config: ModelParallelConfig) -> torch.device:
    """Where new parameters live: the CPU for CPU initialisation or CPU-only machines, else this GPU."""
    return default_device(config.use_cpu_initialization)


def default_device(use_cpu_initialization: bool) -> torch.device:
    if torch.get_default_device().type == "meta":
        return torch.device("meta")  # a model built for its names and shapes only (under `with torch.device("meta")`)
    if use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _split_size_and_rank(is_expert: bool) -> Tuple[int, int]:
    """(ranks a weight is split over, this rank's index): the tensor-parallel group, or for routed experts the
    expert-tensor-parallel group (--expert-tensor-parallel-size)."""
    if is_expert:
        return parallel_state.get_expert_tensor_parallel_world_size(), parallel_state.get_expert_tensor_parallel_rank()
    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _initialize_slice_from_master(
    weight: torch.Tensor,
    full_shape,
    partition_dim: int,
    stride: int,
    init_method: Callable,
    is_expert: bool = False,
) -> None:
    """Initialise the full weight from the default generator and copy this rank's slice into `weight`.

    Every rank draws the same full weight, so the split model starts equal to the unsplit one. `stride`
    > 1 means the weight is a concatenation of `stride` parts each split separately (e.g. [gate; up]).
    """
    master = torch.empty(full_shape, dtype=torch.float32)
    init_method(master)
    master = master.to(dtype=weight.dtype)
    world_size, rank = _split_size_and_rank(is_expert)
    mine = shard_of(master, rank, world_size, partition_dim, stride)
    with torch.no_grad():
        weight.copy_(mine)


def _initialize_weight(
    weight: torch.Tensor,
    full_shape,
    config: ModelParallelConfig,
    init_method: Callable,
    partition_dim: int,
    stride: int = 1,
    is_expert: bool = False,
) -> None:
    set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
    if not config.perform_initialization:
        return
    if config.use_cpu_initialization:
        _initialize_slice_from_master(weight, full_shape, partition_dim, stride, init_method, is_expert)
    else:
        # Each rank draws its own slice from its tensor-parallel stream: different slices per rank.
        with get_cuda_rng_tracker().fork():
            init_method(weight)


def _new_parameter(shape, config: ModelParallelConfig, zero: bool = False) -> torch.nn.Parameter:
    allocate = torch.zeros if zero else torch.empty
    return torch.nn.Parameter(allocate(shape, dtype=config.params_dtype, device=parameter_device(config)))


class _LinearWithMainGradAccumulation(torch.autograd.Function):
    """F.linear whose weight gradient goes straight into `weight.main_grad` (Megatron's gradient-accumulation
    fusion): one addmm per micro batch instead of a fresh weight-sized `.grad` that a hook then adds and frees.
    The weight's autograd gradient is None, so `.grad` is never allocated; its post-accumulate hooks still run
    once per backward, after every use of the weight."""

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.save_for_backward(input_, weight)
        # Kept here: under activation recomputation the saved weight comes back as a plain tensor, attributes lost.
        ctx.main_grad = weight.main_grad
        ctx.has_bias = bias is not None
        return F.linear(input_, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_output_2d = grad_output.reshape(-1, grad_output.size(-1))
        input_2d = input_.reshape(-1, input_.size(-1))
        accumulate_weight_grad(ctx.main_grad, grad_output_2d.t(), input_2d)
        grad_bias = grad_output_2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_input, None, grad_bias


def accumulate_weight_grad(main_grad: torch.Tensor, grad_output_t: torch.Tensor, input_2d: torch.Tensor) -> None:
    """main_grad += grad_output_t @ input_2d: one addmm, or for a bf16 / fp16 weight with an fp32 main_grad the
    product rounded as the unfused weight gradient would be, then added."""
    if main_grad.dtype == input_2d.dtype:
        main_grad.addmm_(grad_output_t, input_2d)
    else:
        main_grad.add_(grad_output_t.mm(input_2d))


def fuses_weight_grad_accumulation(weight: torch.Tensor, gradient_accumulation_fusion: bool) -> bool:
    """Whether an op on `weight` should add its weight gradient into `weight.main_grad` itself."""
    return gradient_accumulation_fusion and torch.is_grad_enabled() and weight.requires_grad and hasattr(weight, "main_grad")


def _linear(input_: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gradient_accumulation_fusion: bool):
    """F.linear, fused with the weight-gradient accumulation where the weight has a `main_grad` to take it."""
    if fuses_weight_grad_accumulation(weight, gradient_accumulation_fusion):
        return _LinearWithMainGradAccumulation.apply(input_, weight, bias)
    return F.linear(input_, weight, bias)


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding whose vocabulary rows are split over tensor-parallel ranks.

    Each rank looks up the ids in its own range (zeros elsewhere) and the partial results are summed:
    all-reduced, or reduce-scattered along the sequence when `reduce_scatter_embeddings` (sequence
    parallelism; the input is then [b, s] and the output [s/tp, b, h]).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        init_method: Callable,
        config: ModelParallelConfig,
        reduce_scatter_embeddings: bool = False,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.reduce_scatter_embeddings = reduce_scatter_embeddings
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        if num_embeddings % world_size:
            raise ValueError(
                f"vocabulary size {num_embeddings} is not divisible by the tensor-parallel size {world_size}; "
                "pad it with --make-vocab-size-divisible-by"
            )
        self.num_embeddings_per_partition = num_embeddings // world_size
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_per_partition_vocab_size(
            self.num_embeddings_per_partition, parallel_state.get_tensor_model_parallel_rank(), world_size
        )
        self.weight = _new_parameter((self.num_embeddings_per_partition, embedding_dim), config)
        _initialize_weight(self.weight, (num_embeddings, embedding_dim), config, init_method, partition_dim=0)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            output = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            output = F.embedding(input_, self.weight)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(output.transpose(0, 1).contiguous())
        return reduce_from_tensor_model_parallel_region(output)


class ColumnParallelLinear(torch.nn.Module):
    """Y = XA + b with A split along its output features: rank r computes Y_r = X A_r + b_r.

    Returns (output, bias): the bias is returned instead of added when `skip_bias_add`, so the caller can
    fuse it into the next elementwise op. `skip_weight_param_allocation` makes a layer whose weight is
    passed to forward (the output layer tied to the word embeddings). `is_expert`: a routed expert's
    projection, split over the expert-tensor-parallel ranks; its token dispatcher gathers the input and reduces
    the output, so the layer itself communicates nothing.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        bias: bool = True,
        gather_output: bool = False,
        stride: int = 1,
        skip_bias_add: bool = False,
        skip_weight_param_allocation: bool = False,
        is_expert: bool = False,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = config.sequence_parallel
        self.is_expert = is_expert
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        world_size, _ = _split_size_and_rank(is_expert)
        self.output_size_per_partition = divide(output_size, world_size)
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = _new_parameter((self.output_size_per_partition, input_size), config)
            _initialize_weight(self.weight, (output_size, input_size), config, init_method, 0, stride, is_expert)
        if bias:
            self.bias = _new_parameter((self.output_size_per_partition,), config, zero=True)
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def weight_for_forward(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight a forward with `weight=` uses: its own unless one of the right shape is passed."""
        if weight is None:
            if self.weight is None:
                raise RuntimeError("this ColumnParallelLinear has no weight of its own; pass weight= to forward")
            return self.weight
        if weight.shape != (self.output_size_per_partition, self.input_size):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} passed to a ColumnParallelLinear expecting "
                f"{(self.output_size_per_partition, self.input_size)}"
            )
        return weight

    def parallel_input(self, input_: torch.Tensor) -> torch.Tensor:
        """The input every rank multiplies by its slice of the weight: gathered over the sequence under sequence
        parallelism, else the same on all ranks with its gradient summed over them."""
        if self.is_expert:
            return input_
        return _column_parallel_input(input_, self.sequence_parallel, allreduce_dgrad=True)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None):
        weight = self.weight_for_forward(weight)
        input_parallel = self.parallel_input(input_)
        bias = None if self.skip_bias_add else self.bias
        output = _linear(input_parallel, weight, bias, self.gradient_accumulation_fusion)
        if self.gather_output:
            output = gather_from_tensor_model_parallel_region(output)
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(torch.nn.Module):
    """Y = XA + b with A split along its input features: rank r computes X_r A_r and the partial
    products are summed (all-reduce, or reduce-scatter along the sequence with sequence parallelism).
    The bias is replicated and added once, after the sum. `is_expert`: as in ColumnParallelLinear, split over
    the expert-tensor-parallel ranks and returning the partial product (the token dispatcher sums it)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: ModelParallelConfig,
        init_method: Callable,
        bias: bool = True,
        input_is_parallel: bool = False,
        skip_bias_add: bool = False,
        stride: int = 1,
        is_expert: bool = False,
    ):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = config.sequence_parallel
        self.is_expert = is_expert
        self.gradient_accumulation_fusion = config.gradient_accumulation_fusion
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("sequence parallelism needs RowParallelLinear inputs that are already split")
        world_size, _ = _split_size_and_rank(is_expert)
        self.input_size_per_partition = divide(input_size, world_size)
        self.weight = _new_parameter((output_size, self.input_size_per_partition), config)
        _initialize_weight(self.weight, (output_size, input_size), config, init_method, 1, stride, is_expert)
        if bias:
            self.bias = _new_parameter((output_size,), config, zero=True)
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
            # Replicated over tensor-parallel ranks; with sequence parallelism each rank sees only part of
            # the sequence, so its gradient must be all-reduced over those ranks.
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor):
        input_parallel = input_ if self.input_is_parallel else scatter_to_tensor_model_parallel_region(input_)
        output_parallel = _linear(input_parallel, self.weight, None, self.gradient_accumulation_fusion)
        if self.is_expert:
            output = output_parallel
        elif self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel)
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel)
        if self.skip_bias_add or self.bias is None:
            return output, (self.bias if self.skip_bias_add else None)
        return output + self.bias, None


def _column_parallel_input(
    input_: torch.Tensor, sequence_parallel: bool, allreduce_dgrad: Optional[bool], async_grad_allreduce: bool = True
) -> torch.Tensor:
    """A column-parallel layer's input: gathered over the sequence under sequence parallelism, else its gradient
    all-reduced over the tensor-parallel ranks when `allreduce_dgrad` (Megatron's default: `async_grad_allreduce`)."""
    if allreduce_dgrad is None:
        allreduce_dgrad = async_grad_allreduce
    if sequence_parallel:
        return gather_from_sequence_parallel_region(input_)
    if allreduce_dgrad:
        return copy_to_tensor_model_parallel_region(input_)
    return input_


def linear_with_grad_accumulation_and_async_allreduce(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gradient_accumulation_fusion: bool,
    async_grad_allreduce: bool,
    sequence_parallel: bool,
    grad_output_buffer: Optional[List[torch.Tensor]] = None,
    wgrad_deferral_limit: Optional[int] = 0,
    allreduce_dgrad: bool = None,
) -> torch.Tensor:
    """Megatron's column-parallel linear op: the input gathered over the sequence under `sequence_parallel`,
    else its gradient all-reduced over the tensor-parallel ranks with `allreduce_dgrad` (default
    `async_grad_allreduce`); with `gradient_accumulation_fusion` the weight gradient is added into
    `weight.main_grad`. Deferred weight gradients (`grad_output_buffer`, `wgrad_deferral_limit`) are not
    supported."""
    if grad_output_buffer is not None or wgrad_deferral_limit:
        raise NotImplementedError("deferred weight-gradient computation is not supported")
    input = _column_parallel_input(input, sequence_parallel, allreduce_dgrad, async_grad_allreduce)
    return _linear(input, weight, bias, gradient_accumulation_fusion)


def linear_with_frozen_weight(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    gradient_accumulation_fusion: bool,
    async_grad_allreduce: bool,
    sequence_parallel: bool,
    grad_output_buffer: Optional[List[torch.Tensor]] = None,
    wgrad_deferral_limit: None = None,
    allreduce_dgrad: bool = None,
) -> torch.Tensor:
    """A column-parallel linear whose weight and bias take no gradient (frozen); the input's gradient is still
    reduced over the tensor-parallel ranks (reduce-scattered under `sequence_parallel`, all-reduced with
    `allreduce_dgrad`, which defaults to `async_grad_allreduce`). The fusion and deferral options are
    accepted for Megatron's signature and change nothing here."""
    input = _column_parallel_input(input, sequence_parallel, allreduce_dgrad, async_grad_allreduce)
    return F.linear(input, weight.detach(), None if bias is None else bias.detach())
