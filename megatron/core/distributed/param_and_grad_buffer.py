"""A contiguous gradient buffer per gradient dtype, split into buckets that are reduced as one tensor each.

Every parameter's `main_grad` is a view into the buffer, so accumulation over micro batches writes in place
and one collective per bucket reduces many gradients at once. For the distributed optimizer each bucket is
padded to a multiple of the data-parallel size and reduce-scattered: data-parallel rank r then owns the
averaged gradient of the r-th equal slice of every bucket (`bucket.shard_range(r)`).
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron.core.utils import reduce_scatter_single


class _ParamAndGradBucket:
    """A run of parameters whose gradients lie side by side in the buffer and are reduced together."""

    def __init__(self, params: List[torch.nn.Parameter], grad_data: torch.Tensor, offset: int, data_parallel_size: int):
        self.params = params
        self.grad_data = grad_data
        self.offset = offset
        """Where the bucket starts in its buffer."""
        self.shard_size = grad_data.numel() // data_parallel_size
        self.params_with_grad = set()
        self.communication_handle = None
        self.communication_issued = False
        self.scattered = None
        """This rank's reduce-scattered slice until it is copied into the buffer."""

    def shard_range(self, data_parallel_rank: int) -> Tuple[int, int]:
        """[start, end) of the slice of this bucket that `data_parallel_rank` owns, relative to the bucket."""
        return data_parallel_rank * self.shard_size, (data_parallel_rank + 1) * self.shard_size

    def reset(self):
        self.params_with_grad = set()
        self.communication_handle = None
        self.communication_issued = False
        self.scattered = None


class _ParamAndGradBuffer:
    """The gradient buffer of one dtype, its buckets, and their data-parallel reduction."""

    def __init__(
        self,
        ddp_config: DistributedDataParallelConfig,
        grad_dtype: torch.dtype,
        params: List[torch.nn.Parameter],
        data_parallel_group: Optional[dist.ProcessGroup],
        bucket_size: Optional[int],
        gradient_scaling_factor: Optional[float] = None,
    ):
        """`gradient_scaling_factor` multiplies the summed gradients (None: average over the group; 1.0 for
        per-token losses, which are summed). Expert buffers reduce over the expert-data-parallel group but
        average over all data-parallel ranks, so they pass 1 / DP."""
        self.ddp_config = ddp_config
        self.grad_dtype = grad_dtype
        self.data_parallel_group = data_parallel_group
        self.data_parallel_world_size = dist.get_world_size(data_parallel_group) if data_parallel_group else 1
        self.data_parallel_rank = dist.get_rank(data_parallel_group) if data_parallel_group else 0
        if gradient_scaling_factor is None:
            gradient_scaling_factor = 1.0 / self.data_parallel_world_size
        self.gradient_scaling_factor = gradient_scaling_factor
        # Backward produces gradients roughly in reverse order, so lay the buffer out that way: the first
        # bucket to fill is then the first one reduced.
        self.params = list(reversed(params))
        self.param_index_map: Dict[torch.nn.Parameter, Tuple[int, int, int]] = {}
        """param -> (start, end, bucket index) of its gradient in the buffer."""
        bucket_bounds = self._lay_out(bucket_size)
        self.grad_data = torch.zeros(bucket_bounds[-1][2], dtype=grad_dtype, device=self.params[0].device)
        for param in self.params:
            start, end, _ = self.param_index_map[param]
            param.main_grad = self.grad_data[start:end].view(param.shape)
        self.buckets: List[_ParamAndGradBucket] = []
        self.param_to_bucket = {}
        for bucket_params, start, end in bucket_bounds:
            bucket = _ParamAndGradBucket(bucket_params, self.grad_data[start:end], start, self.data_parallel_world_size)
            self.buckets.append(bucket)
            for param in bucket_params:
                self.param_to_bucket[param] = bucket

    def _pad(self, end: int) -> int:
        """Bucket ends are padded to a multiple of the data-parallel size when the buckets are sharded."""
        if not self.ddp_config.use_distributed_optimizer:
            return end
        return math.ceil(end / self.data_parallel_world_size) * self.data_parallel_world_size

    def _lay_out(self, bucket_size: Optional[int]) -> List[Tuple[list, int, int]]:
        """Fill `param_index_map`; returns (params, start, padded end) of every bucket."""
        limit = math.inf if bucket_size is None else bucket_size
        bounds, offset, bucket_start, bucket_params = [], 0, 0, []
        for param in self.params:
            self.param_index_map[param] = (offset, offset + param.numel(), len(bounds))
            offset += param.numel()
            bucket_params.append(param)
            if offset - bucket_start >= limit:
                offset = self._pad(offset)
                bounds.append((bucket_params, bucket_start, offset))
                bucket_start, bucket_params = offset, []
        if bucket_params:
            bounds.append((bucket_params, bucket_start, self._pad(offset)))
        return bounds

    def reset(self):
        """Zero the gradients and forget which buckets were reduced (before the next step's backward)."""
        self.grad_data.zero_()
        for bucket in self.buckets:
            bucket.reset()

    def start_bucket_sync(self, bucket: _ParamAndGradBucket, async_op: bool):
        """Average the bucket's gradients over the data-parallel group (once per step): all-reduce, or
        reduce-scatter into this rank's shard for the distributed optimizer."""
        if bucket.communication_issued:
            return
        bucket.communication_issued = True
        op, prescale = dist.ReduceOp.SUM, self.gradient_scaling_factor
        if self.ddp_config.average_in_collective and self.data_parallel_world_size > 1:
            op, prescale = dist.ReduceOp.AVG, prescale * self.data_parallel_world_size
        if prescale != 1.0:
            bucket.grad_data.mul_(prescale)
        if self.data_parallel_world_size == 1:
            return
        self._wait_for_buckets_in_flight()
        if self.ddp_config.use_distributed_optimizer:
            # A separate output: the input must stay intact while an asynchronous collective reads it.
            bucket.scattered = torch.empty(bucket.shard_size, dtype=bucket.grad_data.dtype, device=bucket.grad_data.device)
            bucket.communication_handle = reduce_scatter_single(
                bucket.scattered, bucket.grad_data, op=op, group=self.data_parallel_group, async_op=async_op
            )
        else:
            bucket.communication_handle = dist.all_reduce(
                bucket.grad_data, op=op, group=self.data_parallel_group, async_op=async_op
            )

    def _wait_for_buckets_in_flight(self):
        """One reduction in flight at a time: gloo can run queued collectives on several threads, and two
        ranks pairing them differently would deadlock."""
        for bucket in self.buckets:
            if bucket.communication_handle is not None:
                bucket.communication_handle.wait()
                bucket.communication_handle = None

    def register_grad_ready(self, param: torch.nn.Parameter):
        """Called when `param`'s gradient for this step is complete; reduces its bucket once it is full."""
        bucket = self.param_to_bucket[param]
        if param in bucket.params_with_grad:
            raise RuntimeError(
                f"the gradient of a parameter of shape {tuple(param.shape)} was reported complete twice in one "
                "step: its bucket may have been reduced without the second part (zero_grad_buffer() starts a step)"
            )
        bucket.params_with_grad.add(param)
        if len(bucket.params_with_grad) == len(bucket.params):
            self.start_bucket_sync(bucket, async_op=True)

    def start_grad_sync(self):
        for bucket in self.buckets:
            self.start_bucket_sync(bucket, async_op=self.ddp_config.overlap_grad_reduce)

    def finish_grad_sync(self):
        """Reduce every bucket not reduced yet (e.g. holding unused parameters) and wait for all of them."""
        self.start_grad_sync()
        self._wait_for_buckets_in_flight()
        for bucket in self.buckets:
            if bucket.scattered is not None:
                start, end = bucket.shard_range(self.data_parallel_rank)
                bucket.grad_data[start:end].copy_(bucket.scattered)
                bucket.scattered = None
