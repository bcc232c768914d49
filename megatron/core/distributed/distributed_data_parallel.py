"""The project's DistributedDataParallel: gradients accumulate in contiguous buffers, reduced per bucket.

At data-parallel size 1 nothing is communicated, but the buffers and `main_grad` views are the same, so the
optimizer and the training loop see one code path at every layout.
"""

from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer

DEFAULT_OVERLAP_BUCKET_ELEMENTS = 40_000_000


def _expert_data_parallel_group() -> Optional[dist.ProcessGroup]:
    """Ranks holding the same routed experts (parallel_state's; none before it is initialised)."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_modulo_expert_parallel_group(with_context_parallel=True)


class DistributedDataParallel(torch.nn.Module):
    """Wraps `module`; its trainable parameters get `main_grad` views into per-dtype gradient buffers.

    The data-parallel group defaults to parallel_state's data x context parallel ranks (context-parallel ranks
    hold the same weights and each a part of every sequence's gradient); no group at all before it is
    initialised: one replica, nothing to reduce.

    A post-accumulate hook moves each fresh `.grad` into `main_grad` (so `.grad` stays None; layers with
    gradient-accumulation fusion add into `main_grad` directly), and with `overlap_grad_reduce` starts a
    bucket's all-reduce as soon as the bucket is complete on the last micro batch. `finish_grad_sync()` completes the reduction before the optimizer step.
    """

    def __init__(
        self,
        config,
        ddp_config: DistributedDataParallelConfig,
        module: torch.nn.Module,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        disable_bucketing: bool = False,
        expert_data_parallel_group: Optional[dist.ProcessGroup] = None,
    ):
        super().__init__()
        self.config = config
        self.ddp_config = ddp_config
        self.module = module
        if data_parallel_group is None:
            data_parallel_group = parallel_state.get_data_parallel_group(
                with_context_parallel=True, check_initialized=False
            )
        self.data_parallel_group = data_parallel_group
        self.data_parallel_world_size = dist.get_world_size(data_parallel_group) if data_parallel_group else 1
        bucket_size = ddp_config.bucket_size
        if bucket_size is None and ddp_config.overlap_grad_reduce:
            bucket_size = max(DEFAULT_OVERLAP_BUCKET_ELEMENTS, 1_000_000 * self.data_parallel_world_size)
        if disable_bucketing:
            bucket_size = None
        self.bucket_size = bucket_size

        if expert_data_parallel_group is None:
            expert_data_parallel_group = _expert_data_parallel_group()
        self.expert_data_parallel_group = expert_data_parallel_group
        dense, expert = {}, {}
        for param in module.parameters():
            if param.requires_grad:
                grad_dtype = torch.float32 if ddp_config.grad_reduce_in_fp32 else param.dtype
                kind = dense if getattr(param, "allreduce", True) else expert
                kind.setdefault(grad_dtype, []).append(param)
        # Per-token losses are sums: their gradients are summed here and divided by the global token count
        # in finalize_model_grads. Otherwise each buffer averages over all data-parallel replicas; routed
        # experts (allreduce=False) are summed over the expert-data-parallel ranks holding the same experts.
        scaling = 1.0 if getattr(config, "calculate_per_token_loss", False) else 1.0 / self.data_parallel_world_size
        self.buffers = [
            _ParamAndGradBuffer(ddp_config, grad_dtype, params, data_parallel_group, bucket_size, scaling)
            for grad_dtype, params in dense.items()
        ]
        self.expert_parallel_buffers = [
            _ParamAndGradBuffer(ddp_config, grad_dtype, params, expert_data_parallel_group, bucket_size, scaling)
            for grad_dtype, params in expert.items()
        ]
        self.param_to_buffer = {
            param: buffer for buffer in self.all_buffers() for param in buffer.param_to_bucket
        }
        self.is_last_microbatch = True
        self._hook_handles = [
            param.register_post_accumulate_grad_hook(self._accumulate_into_main_grad) for param in self.param_to_buffer
        ]

    def all_buffers(self):
        """Dense buffers, then the routed experts' (reduced over expert data parallelism)."""
        return [*self.buffers, *self.expert_parallel_buffers]

    def _accumulate_into_main_grad(self, param: torch.nn.Parameter):
        # Runs once per backward pass, after every use of `param`; `.grad` is None when all of them were layers
        # with gradient-accumulation fusion, which added into main_grad themselves.
        if param.grad is not None:
            param.main_grad.add_(param.grad)
            param.grad = None
        if self.ddp_config.overlap_grad_reduce and self.is_last_microbatch:
            self.param_to_buffer[param].register_grad_ready(param)

    def forward(self, *inputs, **kwargs):
        return self.module(*inputs, **kwargs)

    @contextmanager
    def no_sync(self):
        """Micro batches run inside accumulate gradients without starting any reduction."""
        self.is_last_microbatch = False
        try:
            yield
        finally:
            self.is_last_microbatch = True

    def start_grad_sync(self):
        for buffer in self.all_buffers():
            buffer.start_grad_sync()

    def finish_grad_sync(self):
        """All gradients averaged over the data-parallel group; call after the last backward of a step."""
        for buffer in self.all_buffers():
            buffer.finish_grad_sync()

    def scale_gradients(self, scaling_factor: float):
        """Multiply every accumulated gradient by `scaling_factor`."""
        for buffer in self.all_buffers():
            buffer.grad_data.mul_(scaling_factor)

    def zero_grad_buffer(self):
        """Zero the gradient buffers before a step's first backward."""
        for buffer in self.all_buffers():
            buffer.reset()

    def broadcast_params(self):
        """Copy data-parallel rank 0's weights to the other replicas (after a per-replica random init); routed
        experts go from expert-data-parallel rank 0 to the ranks holding the same experts."""
        for param in self.module.parameters():
            group = self.data_parallel_group if getattr(param, "allreduce", True) else self.expert_data_parallel_group
            if group is not None and dist.get_world_size(group) > 1:
                dist.broadcast(param.data, src=dist.get_global_rank(group, 0), group=group)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
