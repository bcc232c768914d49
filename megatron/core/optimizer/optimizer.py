"""Optimizer wrappers around a torch optimizer: gradients from the DDP buffer, clipping, mixed precision.

`step()` returns (update_successful, grad_norm, num_zeros_in_grad); an fp16 step whose gradients overflowed
is skipped (update_successful False, grad_norm None) and the loss scale backs off.
"""

from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron.core.optimizer.clip_grads import (
    clip_grad_by_total_norm_fp32,
    count_zeros_fp32,
    get_grad_norm_over_groups,
    grads_for_norm,
)
from megatron.core.optimizer.grad_scaler import MegatronGradScaler
from megatron.core.optimizer.optimizer_config import OptimizerConfig


class MegatronOptimizer(ABC):
    """The interface the training loop uses, whatever the precision and parallel layout."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        grad_stats_parallel_group: Optional[torch.distributed.ProcessGroup] = None,
        expert_grad_stats_parallel_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        """`expert_grad_stats_parallel_group`: where routed experts' gradient statistics sum when it differs
        from the dense ones' (None: the same group)."""
        self.optimizer = optimizer
        self.config = config
        self.grad_stats_parallel_group = grad_stats_parallel_group
        self.expert_grad_stats_parallel_group = expert_grad_stats_parallel_group

    @property
    def param_groups(self) -> List[dict]:
        """The torch optimizer's groups; the scheduler writes lr and weight_decay into them."""
        return self.optimizer.param_groups

    def get_parameters(self) -> List[torch.nn.Parameter]:
        """The parameters the torch optimizer updates (fp32 master copies under mixed precision)."""
        return [param for group in self.optimizer.param_groups for param in group["params"]]

    def get_loss_scale(self) -> float:
        return 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on."""
        return loss * self.get_loss_scale()

    def _grads_and_stats_groups(self) -> List[tuple]:
        """[(gradients, the group their statistics sum over)]: routed experts (allreduce=False) apart when
        they sum over another group, since each expert-parallel rank holds different experts."""
        params = self.get_parameters()
        if self.expert_grad_stats_parallel_group is None:
            return [(grads_for_norm(params), self.grad_stats_parallel_group)]
        dense = [param for param in params if getattr(param, "allreduce", True)]
        experts = [param for param in params if not getattr(param, "allreduce", True)]
        return [
            (grads_for_norm(dense), self.grad_stats_parallel_group),
            (grads_for_norm(experts), self.expert_grad_stats_parallel_group),
        ]

    def get_grad_norm(self) -> float:
        return get_grad_norm_over_groups(self._grads_and_stats_groups(), 2.0)

    def count_zeros(self) -> int:
        return sum(count_zeros_fp32(grads, group) for grads, group in self._grads_and_stats_groups())

    def _clip_and_step(self) -> Tuple[float, Optional[int]]:
        """Norm, optional clipping, the torch step; returns (grad_norm, num_zeros_in_grad)."""
        grad_norm = self.get_grad_norm()
        if self.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(self.get_parameters(), self.config.clip_grad, grad_norm)
        num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        self.optimizer.step()
        return grad_norm, num_zeros

    @abstractmethod
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients the torch optimizer sees (the DDP buffer is zeroed by the model)."""

    @abstractmethod
    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        """One update: (update_successful, grad_norm, num_zeros_in_grad)."""

    def finish_param_sync(self) -> None:
        """Make every model weight current; only an overlapped parameter gather can leave one stale."""

    @abstractmethod
    def reload_model_params(self) -> None:
        """Refresh any copies of the model weights after the model was loaded without optimizer state."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything a checkpoint needs to continue the updates exactly."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore `state_dict()`."""

    # Per-parameter state for checkpoints that store it sharded like the model (torch_dist): each model
    # parameter's fp32 master ("param", when it is a separate copy) and element-wise optimizer state
    # (exp_avg, exp_avg_sq), whole and in the parameter's shape, whatever the optimizer's own sharding.

    def _model_and_master_params(self) -> List[Tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """(model parameter, the tensor the torch optimizer updates for it)."""
        return [(param, param) for param in self.get_parameters()]

    def param_state_for_checkpoint(self) -> Dict[torch.nn.Parameter, Dict[str, torch.Tensor]]:
        """{model parameter: {state name: tensor of the parameter's shape}}."""
        states = {}
        for model_param, master in self._model_and_master_params():
            saved = self.optimizer.state.get(master, {})
            state = {key: value for key, value in saved.items() if torch.is_tensor(value) and value.shape == master.shape}
            if master is not model_param:
                state["param"] = master.detach()
            states[model_param] = state
        return states

    def checkpoint_scalars(self) -> dict:
        """Per-parameter scalars of the optimizer (Adam's step), equal for every parameter."""
        for _, master in self._model_and_master_params():
            state = self.optimizer.state.get(master, {})
            return {key: value for key, value in state.items() if not (torch.is_tensor(value) and value.dim() > 0)}
        return {}

    def load_param_state_from_checkpoint(self, states: Dict[torch.nn.Parameter, Dict[str, torch.Tensor]], hyperparameters: dict) -> None:
        """Restore `param_state_for_checkpoint()` (parameters missing from `states` keep their state);
        `hyperparameters` is the saved `hyperparameter_state()`, whose scalars go with every parameter."""
        scalars = hyperparameters["scalars"]
        with torch.no_grad():
            for model_param, master in self._model_and_master_params():
                state = dict(states.get(model_param, {}))
                master_values = state.pop("param", model_param)  # saved without masters: the loaded weights
                if master is not model_param:
                    master.copy_(master_values)
                if state:
                    state.update({key: value.clone() if torch.is_tensor(value) else value for key, value in scalars.items()})
                    self.optimizer.state[master] = state

    def hyperparameter_state(self) -> dict:
        """What the optimizer needs besides per-parameter tensors: group hyperparameters and the loss scale."""
        grad_scaler = getattr(self, "grad_scaler", None)
        return {
            "param_groups": [{key: value for key, value in group.items() if key != "params"} for group in self.optimizer.param_groups],
            "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
            "scalars": self.checkpoint_scalars(),
        }

    def load_hyperparameter_state(self, state: dict) -> None:
        if len(state["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"it has {len(state['param_groups'])} parameter groups but this optimizer has {len(self.optimizer.param_groups)}"
            )
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            group.update(saved)
        grad_scaler = getattr(self, "grad_scaler", None)
        if grad_scaler is not None and state.get("grad_scaler"):
            grad_scaler.load_state_dict(state["grad_scaler"])


def _main_grad(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    """The gradient accumulated for `param`: its DDP buffer slice when wrapped, else `.grad`."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def unscale_and_check_for_inf(
    main_params: List[torch.nn.Parameter],
    grad_scaler: MegatronGradScaler,
    found_inf_reduce: Optional[Callable[[torch.Tensor], None]],
) -> bool:
    """Divide the master gradients by the loss scale; True when any of them is inf or NaN on any rank that
    `found_inf_reduce` reaches (every rank must call it: it is a collective)."""
    grads = [param.grad for param in main_params if param.grad is not None]
    if grads:
        torch._foreach_mul_(grads, grad_scaler.inv_scale)
        finite = torch.stack([torch.isfinite(grad).all() for grad in grads]).all()
    else:
        finite = torch.tensor(True)
    found_inf = (~finite).float().reshape(1)
    if found_inf_reduce is not None:
        found_inf_reduce(found_inf)
    return bool(found_inf.item() > 0)


class FP32Optimizer(MegatronOptimizer):
    """Full-precision training: the torch optimizer updates the model's own fp32 parameters."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.get_parameters():
            if set_to_none or param.grad is None:
                param.grad = None
            else:
                param.grad.zero_()

    def step(self):
        for param in self.get_parameters():
            param.grad = _main_grad(param)
        grad_norm, num_zeros = self._clip_and_step()
        return True, grad_norm, num_zeros

    def reload_model_params(self) -> None:
        """The optimizer updates the model's parameters directly: nothing to copy."""

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class Float16OptimizerWithFloat16Params(MegatronOptimizer):
    """fp16/bf16 model weights with fp32 master copies that the torch optimizer updates.

    Gradients (accumulated in the model's buffer, in fp32 when asked) are copied to the masters, unscaled
    and checked for overflow (fp16), clipped, applied, and the masters are copied back into the model.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: OptimizerConfig,
        grad_scaler: Optional[MegatronGradScaler],
        grad_stats_parallel_group=None,
        found_inf_reduce: Optional[Callable[[torch.Tensor], None]] = None,
        expert_grad_stats_parallel_group=None,
    ):
        super().__init__(optimizer, config, grad_stats_parallel_group, expert_grad_stats_parallel_group)
        if config.fp16 and grad_scaler is None:
            raise ValueError("fp16 training needs a grad scaler")
        self.grad_scaler = grad_scaler
        self.found_inf_reduce = found_inf_reduce
        self.model_params: List[torch.nn.Parameter] = []
        self.main_params: List[torch.nn.Parameter] = []
        for group in optimizer.param_groups:
            masters = []
            for param in group["params"]:
                master = param
                if param.dtype in (torch.float16, torch.bfloat16):
                    master = torch.nn.Parameter(param.detach().clone().float())
                    for attribute in ("tensor_model_parallel", "shared", "allreduce"):
                        if hasattr(param, attribute):
                            setattr(master, attribute, getattr(param, attribute))
                self.model_params.append(param)
                self.main_params.append(master)
                masters.append(master)
            group["params"] = masters
        # Adam's state was keyed by the original tensors; nothing was stepped yet, so start clean.
        self.optimizer.state.clear()

    def get_loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def _model_and_master_params(self) -> List[Tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        return list(zip(self.model_params, self.main_params))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Master gradients are fresh copies each step, so they are always dropped."""
        for param in self.model_params + self.main_params:
            param.grad = None

    def _copy_model_grads_to_main_grads(self) -> None:
        for model_param, main_param in zip(self.model_params, self.main_params):
            grad = _main_grad(model_param)
            main_param.grad = None if grad is None else grad.float()

    def _copy_main_params_to_model_params(self) -> None:
        with torch.no_grad():
            for model_param, main_param in zip(self.model_params, self.main_params):
                if model_param is not main_param:
                    model_param.copy_(main_param)

    def step(self):
        self._copy_model_grads_to_main_grads()
        if self.grad_scaler is not None:
            found_inf = unscale_and_check_for_inf(self.main_params, self.grad_scaler, self.found_inf_reduce)
            self.grad_scaler.update(found_inf)
            if found_inf:
                return False, None, None
        grad_norm, num_zeros = self._clip_and_step()
        self._copy_main_params_to_model_params()
        return True, grad_norm, num_zeros

    def reload_model_params(self) -> None:
        with torch.no_grad():
            for model_param, main_param in zip(self.model_params, self.main_params):
                if model_param is not main_param:
                    main_param.copy_(model_param)

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "fp32_from_fp16_params": [param.detach().clone() for param in self.main_params],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        if self.grad_scaler is not None and state_dict.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        saved = state_dict["fp32_from_fp16_params"]
        if len(saved) != len(self.main_params):
            raise ValueError(
                f"the checkpoint holds {len(saved)} master parameters but the model has {len(self.main_params)}"
            )
        with torch.no_grad():
            for main_param, saved_param in zip(self.main_params, saved):
                main_param.copy_(saved_param)


class ChainedOptimizer(MegatronOptimizer):
    """Several optimizers (e.g. over disjoint parameter sets) driven as one: each steps its own parameters;
    the gradient norm reported is that of all of them together."""

    def __init__(self, chained_optimizers: List[MegatronOptimizer]):
        if not chained_optimizers:
            raise ValueError("ChainedOptimizer needs at least one optimizer")
        super().__init__(chained_optimizers[0].optimizer, chained_optimizers[0].config)
        self.chained_optimizers = chained_optimizers

    @property
    def param_groups(self) -> List[dict]:
        return [group for optimizer in self.chained_optimizers for group in optimizer.param_groups]

    def get_parameters(self) -> List[torch.nn.Parameter]:
        return [param for optimizer in self.chained_optimizers for param in optimizer.get_parameters()]

    def get_loss_scale(self) -> float:
        return self.chained_optimizers[0].get_loss_scale()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return self.chained_optimizers[0].scale_loss(loss)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.chained_optimizers:
            optimizer.zero_grad(set_to_none)

    def step(self) -> Tuple[bool, Optional[float], Optional[int]]:
        results = [optimizer.step() for optimizer in self.chained_optimizers]
        update_successful = all(result[0] for result in results)
        norms = [result[1] for result in results]
        grad_norm = None if None in norms else sum(norm**2 for norm in norms) ** 0.5
        zeros = [result[2] for result in results]
        num_zeros = None if None in zeros else sum(zeros)
        return update_successful, grad_norm, num_zeros

    def finish_param_sync(self) -> None:
        for optimizer in self.chained_optimizers:
            optimizer.finish_param_sync()

    def reload_model_params(self) -> None:
        for optimizer in self.chained_optimizers:
            optimizer.reload_model_params()

    def state_dict(self) -> list:
        return [optimizer.state_dict() for optimizer in self.chained_optimizers]

    def param_state_for_checkpoint(self) -> Dict[torch.nn.Parameter, Dict[str, torch.Tensor]]:
        return {param: state for optimizer in self.chained_optimizers for param, state in optimizer.param_state_for_checkpoint().items()}

    def load_param_state_from_checkpoint(self, states, hyperparameters: list) -> None:
        for optimizer, saved in zip(self.chained_optimizers, hyperparameters):
            optimizer.load_param_state_from_checkpoint(states, saved)

    def hyperparameter_state(self) -> list:
        return [optimizer.hyperparameter_state() for optimizer in self.chained_optimizers]

    def load_hyperparameter_state(self, state: list) -> None:
        if len(state) != len(self.chained_optimizers):
            raise ValueError(f"{len(state)} optimizer states for {len(self.chained_optimizers)} chained optimizers")
        for optimizer, saved in zip(self.chained_optimizers, state):
            optimizer.load_hyperparameter_state(saved)

    def load_state_dict(self, state_dict: list) -> None:
        if len(state_dict) != len(self.chained_optimizers):
            raise ValueError(f"{len(state_dict)} optimizer states for {len(self.chained_optimizers)} chained optimizers")
        for optimizer, state in zip(self.chained_optimizers, state_dict):
            optimizer.load_state_dict(state)
