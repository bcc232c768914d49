"""MoE auxiliary losses in the training log: Megatron's names (`load_balancing_loss`, `seq_load_balancing_loss`,
`global_load_balancing_loss`, `z_loss`), unscaled (loss / coeff), averaged over MoE layers (multi-token
prediction depths included, as Megatron counts them), micro batches and the ranks that train the same model
part, printed beside `lm loss`; likewise each multi-token prediction depth's loss (`mtp_1 loss`, ...)."""

from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import is_moe_layer
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    num_layers_with_aux_losses,
)
from megatron.core.transformer.moe.router import AUX_LOSS_NAMES
from megatron.core.transformer.multi_token_prediction import clear_mtp_loss_tracker, get_mtp_loss_tracker


def _logged_names(config) -> List[str]:
    """The losses this model reports, the same on every rank (stages without MoE layers included)."""
    types, coeffs = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    types, coeffs = ([types], [coeffs]) if isinstance(types, str) else (types, coeffs)
    names = [AUX_LOSS_NAMES[name] for name, coeff in zip(types, coeffs) if name in AUX_LOSS_NAMES and coeff > 0]
    return names + (["z_loss"] if config.moe_z_loss_coeff else [])


def _all_reduce(values: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, group=group)
    return values


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() and dist.get_backend() == "nccl" else torch.device("cpu")


def _summed_over_its_group(entry, num_layers: int) -> torch.Tensor:
    """One loss's per-layer values; a balancing loss is split over the ranks that counted its tokens together
    (tensor x context parallel: each holds part of the sequence) and summed over them first."""
    if entry is None:
        return torch.zeros(num_layers, device=_device())
    return _all_reduce(entry["values"].float().to(_device()), entry.get("reduce_group"))


def _averaged_over_replicas(values: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """Per-micro-batch sums from whichever pipeline stage holds them, averaged over micro batches and the
    tensor x data x context parallel ranks."""
    values = values.to(_device())
    _all_reduce(values, parallel_state.get_pipeline_model_parallel_group())
    replicas = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return _all_reduce(values, replicas) / (dist.get_world_size(replicas) * num_microbatches)


def mtp_loss_report(config, num_microbatches: int) -> Dict[str, float]:
    """{`mtp_{k} loss`: value} of this step (a collective like moe_aux_loss_report); clears the tracker."""
    if not config.mtp_num_layers:
        return {}
    tracker = get_mtp_loss_tracker()
    depths = range(1, config.mtp_num_layers + 1)
    values = torch.stack([tracker[depth].float().cpu() if depth in tracker else torch.zeros(()) for depth in depths])
    values = _averaged_over_replicas(values, num_microbatches)
    clear_mtp_loss_tracker()
    return {f"mtp_{depth} loss": value for depth, value in zip(depths, values.tolist())}


def moe_aux_loss_report(config, num_microbatches: int, writer=None, iteration: int = 0, per_layer: bool = False) -> Dict[str, float]:
    """{name: value} of this step's aux losses (a collective over pipeline and tensor x data x context parallel
    ranks); clears the tracker. With `per_layer`, TensorBoard also gets `moe/{name}_layer_{i}`."""
    names = _logged_names(config)
    if config.num_moe_experts is None or not names:
        return {}
    tracker = get_moe_layer_wise_logging_tracker()
    num_layers = num_layers_with_aux_losses(config)  # multi-token prediction depths after the decoder layers
    values = torch.stack([_summed_over_its_group(tracker.get(name), num_layers) for name in names])
    values = _averaged_over_replicas(values, num_microbatches)
    clear_aux_losses_tracker()
    num_moe_layers = sum(is_moe_layer(config, layer) for layer in range(1, num_layers + 1))
    if writer is not None and per_layer:
        for name, layer_values in zip(names, values.tolist()):
            for layer, value in enumerate(layer_values):
                writer.add_scalar(f"moe/{name}_layer_{layer}", value, iteration)
    return {name: (layer_values.sum() / num_moe_layers).item() for name, layer_values in zip(names, values)}
