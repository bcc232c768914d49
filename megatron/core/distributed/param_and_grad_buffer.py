"""A contiguous gradient buffer per gradient dtype, split into buckets that are reduced as one tensor each.

Every parameter's `main_grad` is a view into the buffer, so accumulation over micro batches writes in place
and one collective per bucket reduces many gradients at once.
"""

import math
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig


class _ParamAndGradBucket:
    """A run of parameters whose gradients lie side by side in the buffer and are reduced together."""

    def __init__(self, params: List[torch.nn.Parameter], grad_data: torch.Tensor):
        self.params = params
        self.grad_data = grad_data
        self.params_with_grad = set()
        self.communication_handle = None
        self.communication_issued = False

    def reset(self):
        self.params_with_grad = set()
        self.communication_handle = None
        self.communication_issued = False


class _ParamAndGradBuffer:
    """The gradient buffer of one dtype, its buckets, and their data-parallel reduction."""

    def __init__(
        self,
        ddp_config: DistributedDataParallelConfig,
        grad_dtype: torch.dtype,
        params: List[torch.nn.Parameter],
        data_parallel_group: Optional[dist.ProcessGroup],
        bucket_size: Optional[int],
    ):
        self.ddp_config = ddp_config
        self.grad_dtype = grad_dtype
        self.data_parallel_group = data_parallel_group
        self.data_parallel_world_size = dist.get_world_size(data_parallel_group) if data_parallel_group else 1
        # Backward produces gradients roughly in reverse order, so lay the buffer out that way: the first
        # bucket to fill is then the first one reduced.
        ordered = list(reversed(params))
        total = sum(param.numel() for param in ordered)
        self.grad_data = torch.zeros(total, dtype=grad_dtype, device=ordered[0].device)
        self.buckets: List[_ParamAndGradBucket] = []
        self.param_to_bucket = {}
        limit = math.inf if bucket_size is None else bucket_size
        offset, bucket_start, bucket_params = 0, 0, []
        for param in ordered:
            param.main_grad = self.grad_data[offset : offset + param.numel()].view(param.shape)
            offset += param.numel()
            bucket_params.append(param)
            if offset - bucket_start >= limit:
                self._add_bucket(bucket_params, bucket_start, offset)
                bucket_start, bucket_params = offset, []
        if bucket_params:
            self._add_bucket(bucket_params, bucket_start, offset)

    def _add_bucket(self, params, start, end):
        bucket = _ParamAndGradBucket(params, self.grad_data[start:end])
        self.buckets.append(bucket)
        for param in params:
            self.param_to_bucket[param] = bucket

    def reset(self):
        """Zero the gradients and forget which buckets were reduced (before the next step's backward)."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()

    def start_bucket_sync(self, bucket: _ParamAndGradBucket, async_op: bool):
        """Average the bucket's gradients over the data-parallel group (once per step)."""
        if bucket.communication_issued:
            return
        bucket.communication_issued = True
        if self.data_parallel_world_size == 1:
            return
        if self.ddp_config.average_in_collective:
            op = dist.ReduceOp.AVG
        else:
            bucket.grad_data.div_(self.data_parallel_world_size)
            op = dist.ReduceOp.SUM
        bucket.communication_handle = dist.all_reduce(
            bucket.grad_data, op=op, group=self.data_parallel_group, async_op=async_op
        )

    def register_grad_ready(self, param: torch.nn.Parameter):
        """Called when `param`'s gradient for this step is complete; reduces its bucket once it is full."""
        bucket = self.param_to_bucket[param]
        bucket.params_with_grad.add(param)
        if len(bucket.params_with_grad) == len(bucket.params):
            self.start_bucket_sync(bucket, async_op=True)

    def start_grad_sync(self):
        for bucket in self.buckets:
            self.start_bucket_sync(bucket, async_op=self.ddp_config.overlap_grad_reduce)

    def finish_grad_sync(self):
        """Reduce every bucket not reduced yet (e.g. holding unused parameters) and wait for all of them."""
        self.start_grad_sync()
        for bucket in self.buckets:
            if bucket.communication_handle is not None:
                bucket.communication_handle.wait()
                bucket.communication_handle = None
