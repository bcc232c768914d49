"""Moved to megatron.core.optimizer_param_scheduler (Megatron-core's path); this name keeps old imports working."""

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = ["OptimizerParamScheduler"]
