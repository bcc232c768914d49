"""ModelParallelConfig: how a model is split over processes and in which precision it runs."""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration field that is out of range or inconsistent with another; the message names both."""


@dataclass
class ModelParallelConfig:
    """Parallel layout and precision shared by every module of a model (Megatron-core field names)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    """Shard norms and dropout along the sequence over the tensor-parallel ranks."""

    perform_initialization: bool = True
    """False skips weight initialisation (the weights are about to be loaded)."""
    use_cpu_initialization: bool = False
    """Build every full weight on the CPU from the seed and keep this rank's slice, so any layout starts
    from the same weights; otherwise each rank initialises its own slice on its device."""

    gradient_accumulation_fusion: bool = False
    """Add each linear layer's weight gradient straight into its `main_grad` buffer (DistributedDataParallel's)
    with one addmm instead of allocating a `.grad` and adding it: no weight-sized temporary per micro batch."""

    fp16: bool = False
    bf16: bool = False
    params_dtype: torch.dtype = torch.float32

    # Read by the pipeline schedules (set by the training loop).
    timers: Optional[Callable] = None
    """megatron.training.get_timers(): the schedules time 'forward-compute' and 'backward-compute' with it."""
    pipeline_dtype: Optional[torch.dtype] = None
    grad_scale_func: Optional[Callable] = None
    no_sync_func: Optional[Callable] = None
    finalize_model_grads_func: Optional[Callable] = None

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("tensor_model_parallel_size and pipeline_model_parallel_size must be at least 1")
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 are mutually exclusive; choose one")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError(
                "sequence_parallel shards along the sequence over tensor-parallel ranks and needs "
                "tensor_model_parallel_size > 1 (--sequence-parallel without --tensor-model-parallel-size)"
            )
        if self.virtual_pipeline_model_parallel_size is not None:
            if self.virtual_pipeline_model_parallel_size < 1:
                raise ConfigError("virtual_pipeline_model_parallel_size must be at least 1")
            if self.pipeline_model_parallel_size == 1 and self.virtual_pipeline_model_parallel_size > 1:
                raise ConfigError("virtual pipeline stages need pipeline_model_parallel_size > 1")
        if self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype
