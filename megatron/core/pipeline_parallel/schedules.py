"""Forward-backward schedules: run a step's micro batches through the model and return their loss reports.

`get_forward_backward_func()` picks the schedule for the pipeline layout. Every schedule takes the same
keywords, and reads hooks from the model's config when they are set there: `grad_scale_func` (loss scaling),
`no_sync_func` (defer gradient reduction until the last micro batch) and `finalize_model_grads_func`.

A `forward_step_func(data_iterator, model)` returns `(output_tensor, loss_func)`; `loss_func(output_tensor)`
returns `(loss_sum, num_tokens, report)` (the loss is divided by the tokens here) or `(loss, report)`.
"""

import contextlib
from typing import Callable, Iterator, List, Union

import torch

from megatron.core import parallel_state


def get_model_config(model: torch.nn.Module):
    """The config of a model, looking through wrappers (DDP, ...) that hold it as `.module`."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "config"):
        raise AttributeError(f"{type(model).__name__} has no `config`: the schedules read their hooks from it")
    return model.config


def get_forward_backward_func() -> Callable:
    """The schedule for this process's pipeline layout."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError(
            "--pipeline-model-parallel-size above 1 needs the pipelined schedules, which this build does not "
            "include; train with --pipeline-model-parallel-size 1"
        )
    return forward_backward_no_pipelining


def forward_step(forward_step_func, data_iterator, model, num_microbatches, forward_data_store):
    """One micro batch forward; returns the loss to backpropagate (already divided for accumulation)."""
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    outputs = loss_func(output_tensor)
    if len(outputs) == 3:
        loss, num_tokens, report = outputs
        loss = loss / num_tokens.clamp(min=1)
    elif len(outputs) == 2:
        loss, report = outputs
    else:
        raise ValueError("loss_func must return (loss, num_tokens, report) or (loss, report)")
    forward_data_store.append(report)
    return loss / num_microbatches


def backward_step(loss: torch.Tensor, config) -> None:
    """Backward of one micro batch's loss, scaled first when the optimizer uses a loss scale."""
    grad_scale_func = getattr(config, "grad_scale_func", None)
    if grad_scale_func is not None:
        loss = grad_scale_func(loss)
    torch.autograd.backward(loss)


def forward_backward_no_pipelining(
    *,
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: Union[torch.nn.Module, List[torch.nn.Module]],
    num_microbatches: int,
    seq_length: int = None,
    micro_batch_size: int = None,
    forward_only: bool = False,
) -> List[dict]:
    """All micro batches through the whole model on this rank, accumulating gradients.

    Gradient reduction is deferred (`no_sync_func`) until the last micro batch, whose backward may overlap
    the reduction; `finalize_model_grads_func` then completes it. `seq_length` and `micro_batch_size` shape
    pipeline messages in the pipelined schedules and are unused here. Returns each micro batch's report.
    """
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError("the no-pipelining schedule runs exactly one model chunk")
        model = model[0]
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    config = get_model_config(model)
    no_sync_func = getattr(config, "no_sync_func", None) or contextlib.nullcontext
    forward_data_store = []

    def run_microbatch():
        loss = forward_step(forward_step_func, data_iterator, model, num_microbatches, forward_data_store)
        if not forward_only:
            backward_step(loss, config)

    with no_sync_func():
        for _ in range(num_microbatches - 1):
            run_microbatch()
    run_microbatch()

    finalize_model_grads_func = getattr(config, "finalize_model_grads_func", None)
    if finalize_model_grads_func is not None and not forward_only:
        finalize_model_grads_func([model])
    return forward_data_store
