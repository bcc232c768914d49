"""Pipeline schedules: the forward-backward function the training loop calls."""

from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

__all__ = ["get_forward_backward_func"]
