"""The optimizer factory: parameter groups, Adam (decoupled weight decay) or SGD, and the precision wrapper."""

import logging
from typing import Callable, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler, MegatronGradScaler
from megatron.core.optimizer.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
)
from megatron.core.optimizer.optimizer_config import OptimizerConfig

logger = logging.getLogger(__name__)

try:
    from apex.optimizers import FusedAdam as _ApexFusedAdam
except ImportError:
    _ApexFusedAdam = None


def default_no_weight_decay_cond(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and one-dimensional weights (norm scales) are not decayed."""
    return name.endswith(".bias") or param.dim() == 1


def get_param_groups(
    model_chunks: List[torch.nn.Module], no_weight_decay_cond: Optional[Callable] = None
) -> List[dict]:
    """Two groups: decayed parameters (wd_mult 1) and the rest (wd_mult 0); empty groups are dropped.

    The scheduler multiplies its weight decay by each group's `wd_mult`.
    """
    no_weight_decay_cond = no_weight_decay_cond or default_no_weight_decay_cond
    decayed, not_decayed = [], []
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            (not_decayed if no_weight_decay_cond(name, param) else decayed).append(param)
    groups = [
        {"params": decayed, "wd_mult": 1.0},
        {"params": not_decayed, "wd_mult": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _build_torch_optimizer(config: OptimizerConfig, param_groups: List[dict]) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay (apex FusedAdam on CUDA, else torch's fused AdamW, which has CPU kernels
    since torch 2.4: ~6x faster than foreach there; foreach for other devices), or SGD."""
    lr = config.lr if config.lr is not None else 0.0
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=config.weight_decay, momentum=config.sgd_momentum)
    devices = {param.device.type for group in param_groups for param in group["params"]}
    betas = (config.adam_beta1, config.adam_beta2)
    if _ApexFusedAdam is not None and devices == {"cuda"}:
        return _ApexFusedAdam(param_groups, lr=lr, weight_decay=config.weight_decay, betas=betas, eps=config.adam_eps)
    kernel = {"fused": True} if devices <= {"cuda", "cpu"} and len(devices) == 1 else {"foreach": True}
    return torch.optim.AdamW(
        param_groups, lr=lr, weight_decay=config.weight_decay, betas=betas, eps=config.adam_eps, **kernel
    )


def _grad_scaler(config: OptimizerConfig) -> Optional[MegatronGradScaler]:
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(
        initial_scale=config.initial_loss_scale,
        min_scale=config.min_loss_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=config.loss_scale_window,
        hysteresis=config.hysteresis,
    )


def get_megatron_optimizer(
    config: OptimizerConfig,
    model_chunks: List[torch.nn.Module],
    no_weight_decay_cond: Optional[Callable] = None,
) -> MegatronOptimizer:
    """The optimizer for `model_chunks`: fp32 training, or fp16/bf16 with fp32 master weights, optionally
    sharded over data-parallel ranks (the chunks must then be DistributedDataParallel with
    `use_distributed_optimizer`)."""
    param_groups = get_param_groups(model_chunks, no_weight_decay_cond)
    if config.use_distributed_optimizer:
        return DistributedOptimizer(
            config,
            model_chunks,
            param_groups,
            lambda shard_groups: _build_torch_optimizer(config, shard_groups),
            _grad_scaler(config),
            parallel_state.get_data_parallel_group(with_context_parallel=True, check_initialized=False),
            # Each rank holds distinct gradient shards, so the global norm sums over every rank.
            torch.distributed.group.WORLD if torch.distributed.is_initialized() else None,
        )
    torch_optimizer = _build_torch_optimizer(config, param_groups)
    model_parallel_group = parallel_state.get_model_parallel_group(check_initialized=False)
    expert_group = _expert_model_parallel_stats_group(model_chunks)
    if not (config.fp16 or config.bf16):
        return FP32Optimizer(torch_optimizer, config, model_parallel_group, expert_group)
    inf_group = expert_group or model_parallel_group

    def found_inf_reduce(found_inf: torch.Tensor) -> None:
        """An overflow on any model-parallel (or expert-parallel) rank skips the step on all of them."""
        if inf_group is not None and torch.distributed.get_world_size(inf_group) > 1:
            torch.distributed.all_reduce(found_inf, op=torch.distributed.ReduceOp.MAX, group=inf_group)

    return Float16OptimizerWithFloat16Params(
        torch_optimizer, config, _grad_scaler(config), model_parallel_group, found_inf_reduce, expert_group
    )


def _expert_model_parallel_stats_group(model_chunks: List[torch.nn.Module]):
    """Where routed experts' gradient norms sum (tensor x expert x pipeline parallel ranks), for a model with
    experts under initialised parallel state; None otherwise (everything sums over the model-parallel group)."""
    has_experts = any(getattr(getattr(chunk, "config", None), "num_moe_experts", None) for chunk in model_chunks)
    if not has_experts or not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_model_parallel_group(with_expert_parallel=True)


__all__ = [
    "ConstantGradScaler",
    "DistributedOptimizer",
    "DynamicGradScaler",
    "Float16OptimizerWithFloat16Params",
    "FP32Optimizer",
    "MegatronOptimizer",
    "OptimizerConfig",
    "get_grad_norm_fp32",
    "get_megatron_optimizer",
    "get_param_groups",
]
