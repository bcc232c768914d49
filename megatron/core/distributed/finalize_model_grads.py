"""The last step of a backward pass: finish every gradient reduction before the optimizer runs."""

from typing import List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import update_routers_expert_bias
from megatron.core.transformer.moe.router import TopKRouter


def _unwrap(model_chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model_chunk, "module"):
        model_chunk = model_chunk.module
    return model_chunk


def _allreduce_embedding_grads(model: List[torch.nn.Module]) -> None:
    """Sum the tied word-embedding gradients of the first and last pipeline stages, so both copies take
    the same optimizer step and stay equal."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    group = parallel_state.get_embedding_group()
    if group is None or torch.distributed.get_world_size(group) == 1:
        return
    if parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        model_chunk = model[0]
    else:
        model_chunk = model[-1]
    module = _unwrap(model_chunk)
    if hasattr(module, "pipeline_tied_embedding_weight"):
        weight = module.pipeline_tied_embedding_weight()  # mcore: also the multi-token prediction embedding copy
    elif getattr(module, "share_embeddings_and_output_weights", False):
        weight = module.shared_embedding_or_output_weight()
    else:
        return
    if weight is None:
        return
    grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
    torch.distributed.all_reduce(grad, group=group)


def _allreduce_sequence_parallel_grads(model: List[torch.nn.Module]) -> None:
    """Sum over tensor-parallel ranks the gradients of weights replicated there but applied to a part of the
    data: norm scales under --sequence-parallel (each rank saw its part of the sequence) and q/k head norms
    (each rank normalised its own heads)."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [
        param.main_grad
        for model_chunk in model
        for param in model_chunk.parameters()
        if param.requires_grad
        and (getattr(param, "sequence_parallel", False) or getattr(param, "tensor_parallel_partial_grad", False))
    ]
    if not grads:
        return
    coalesced = torch.cat([grad.reshape(-1) for grad in grads])
    torch.distributed.all_reduce(coalesced, group=parallel_state.get_tensor_model_parallel_group())
    for grad, reduced in zip(grads, torch.split(coalesced, [grad.numel() for grad in grads])):
        grad.copy_(reduced.view_as(grad))


def _scale_by_token_count(model: List[torch.nn.Module], num_tokens: torch.Tensor) -> None:
    """Divide the summed gradients by the step's non-padded tokens over all data x context parallel ranks (the
    last pipeline stage counted them; it tells the other stages)."""
    num_tokens = num_tokens.to(torch.int64)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(
            num_tokens,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    data_parallel_group = parallel_state.get_data_parallel_group(with_context_parallel=True, check_initialized=False)
    if data_parallel_group is not None:
        torch.distributed.all_reduce(num_tokens, group=data_parallel_group)
    if num_tokens.item() > 0:
        for model_chunk in model:
            model_chunk.scale_gradients(1.0 / num_tokens.item())


def _update_router_expert_bias(model: List[torch.nn.Module]) -> None:
    """The aux-loss-free expert-bias step, once per global batch before the optimizer: token counts summed
    over tensor x data x context parallel ranks (every rank that routed part of the global batch). The global
    aux loss's counts restart too."""
    routers = [module for model_chunk in model for module in model_chunk.modules() if isinstance(module, TopKRouter)]
    for router in routers:
        router.reset_global_aux_loss_tracker()
    if not any(router.enable_expert_bias for router in routers):
        return
    group = None
    if parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    update_routers_expert_bias(routers, group)


def finalize_model_grads(model: List[torch.nn.Module], num_tokens: Optional[torch.Tensor] = None) -> None:
    """Complete the data-parallel gradient reduction of each model chunk, then sync tied embeddings;
    with `num_tokens` (--calculate-per-token-loss) divide the summed gradients by the global token count."""
    for model_chunk in model:
        model_chunk.finish_grad_sync()
    _allreduce_sequence_parallel_grads(model)
    _allreduce_embedding_grads(model)
    _update_router_expert_bias(model)
    if num_tokens is not None:
        _scale_by_token_count(model, num_tokens)
