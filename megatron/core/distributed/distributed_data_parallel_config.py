"""DistributedDataParallelConfig: how gradients are buffered and reduced across data-parallel ranks."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class DistributedDataParallelConfig:
    """Megatron core's field names for the data-parallel gradient reduction."""

    grad_reduce_in_fp32: bool = False
    """Keep the gradient buffer (accumulation and all-reduce) in fp32 whatever the parameter dtype."""

    overlap_grad_reduce: bool = False
    """Start each bucket's all-reduce as soon as backward has produced all of its gradients."""

    use_distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (reduce-scatter instead of all-reduce)."""

    bucket_size: Optional[int] = None
    """Gradient elements per bucket; None means one bucket per dtype, or 40M elements when overlapping."""

    average_in_collective: bool = False
    """Average with the collective (ReduceOp.AVG) instead of pre-dividing by the data-parallel size."""
