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


class DistributedDataParallel(torch.nn.Module):
    """Wraps `module`; its trainable parameters get `main_grad` views into per-dtype gradient buffers.

    The data-parallel group defaults to parallel_state's (no group at all before it is initialised: one
    replica, nothing to reduce).

    A post-accumulate hook moves each fresh `.grad` into `main_grad` (so `.grad` stays None), and with
    `overlap_grad_reduce` starts a bucket's all-reduce as soon as the bucket is complete on the last micro
    batch. `finish_grad_sync()` completes the reduction before the optimizer step.
    """

    def __init__(
        self,
        config,
        ddp_config: DistributedDataParallelConfig,
        module: torch.nn.Module,
        data_parallel_group: Optional[dist.ProcessGroup] = None,
        disable_bucketing: bool = False,
    ):
        super().__init__()
        self.config = config
        self.ddp_config = ddp_config
        self.module = module
        if data_parallel_group is None:
            data_parallel_group = parallel_state.get_data_parallel_group(check_initialized=False)
        self.data_parallel_group = data_parallel_group
        self.data_parallel_world_size = dist.get_world_size(data_parallel_group) if data_parallel_group else 1
        bucket_size = ddp_config.bucket_size
        if bucket_size is None and ddp_config.overlap_grad_reduce:
            bucket_size = max(DEFAULT_OVERLAP_BUCKET_ELEMENTS, 1_000_000 * self.data_parallel_world_size)
        if disable_bucketing:
            bucket_size = None
        self.bucket_size = bucket_size

        params_by_grad_dtype = {}
        for param in module.parameters():
            if param.requires_grad:
                grad_dtype = torch.float32 if ddp_config.grad_reduce_in_fp32 else param.dtype
                params_by_grad_dtype.setdefault(grad_dtype, []).append(param)
        # Per-token losses are sums: their gradients are summed here and divided by the global token count
        # in finalize_model_grads.
        average = not getattr(config, "calculate_per_token_loss", False)
        self.buffers = [
            _ParamAndGradBuffer(ddp_config, grad_dtype, params, data_parallel_group, bucket_size, average)
            for grad_dtype, params in params_by_grad_dtype.items()
        ]
        self.param_to_buffer = {param: buffer for buffer in self.buffers for param in buffer.param_to_bucket}
        self.is_last_microbatch = True
        self._hook_handles = [
            param.register_post_accumulate_grad_hook(self._accumulate_into_main_grad) for param in self.param_to_buffer
        ]

    def _accumulate_into_main_grad(self, param: torch.nn.Parameter):
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
        for buffer in self.buffers:
            buffer.start_grad_sync()

    def finish_grad_sync(self):
        """All gradients averaged over the data-parallel group; call after the last backward of a step."""
        for buffer in self.buffers:
            buffer.finish_grad_sync()

    def scale_gradients(self, scaling_factor: float):
        """Multiply every accumulated gradient by `scaling_factor`."""
        for buffer in self.buffers:
            buffer.grad_data.mul_(scaling_factor)

    def zero_grad_buffer(self):
        """Zero the gradient buffers before a step's first backward."""
        for buffer in self.buffers:
            buffer.reset()

    def broadcast_params(self):
        """Copy data-parallel rank 0's weights to the other replicas (after a per-replica random init)."""
        if self.data_parallel_world_size == 1:
            return
        source = dist.get_global_rank(self.data_parallel_group, 0)
        for param in self.module.parameters():
            dist.broadcast(param.data, src=source, group=self.data_parallel_group)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
