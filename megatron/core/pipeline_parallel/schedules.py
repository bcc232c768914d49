"""Forward-backward schedules: run a step's micro batches through the model and return their loss reports.

`get_forward_backward_func()` picks the schedule for the pipeline layout: no pipelining, 1F1B, or the
interleaved 1F1B over virtual stages. Every schedule takes the same keywords, and reads hooks from the
model's config when they are set there: `grad_scale_func` (loss scaling), `no_sync_func` (defer gradient
reduction until the last micro batch) and `finalize_model_grads_func`.

A `forward_step_func(data_iterator, model)` returns `(output_tensor, loss_func)`; `loss_func(output_tensor)`
returns `(loss_sum, num_tokens, report)` (the loss is divided by the tokens here) or `(loss, report)`.
With pipelining only the last stage calls `loss_func`; the others send `output_tensor` on.
"""

import contextlib
from typing import Callable, Iterator, List, Optional, Union

import torch

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import p2p_communication as p2p
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.utils import get_attr_wrapped_model, get_model_config


def _set_input_tensor(model: torch.nn.Module, input_tensor) -> None:
    """Hand the previous stage's activations to the model under any wrappers."""
    get_attr_wrapped_model(model, "set_input_tensor")(input_tensor)


@contextlib.contextmanager
def _timed(config, name: str):
    """Time a phase with the config's timers (megatron.training.get_timers()) when the caller set them."""
    timers = getattr(config, "timers", None)
    if timers is None:
        yield
        return
    timers(name, log_level=2).start()
    try:
        yield
    finally:
        timers(name).stop()


def get_forward_backward_func() -> Callable:
    """The schedule for this process's pipeline layout."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return forward_backward_no_pipelining
    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is not None:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


def _set_moe_aux_loss_scale(config, num_microbatches: int) -> None:
    """MoE aux losses join the backward through MoEAuxLossAutoScaler: give them the main loss's scale (loss
    scale / micro batches), on every pipeline stage, as Megatron does. Times the context-parallel size: like the
    main loss's gradients, theirs are averaged over the context-parallel ranks that each hold part of the tokens."""
    if getattr(config, "num_moe_experts", None) is None:
        return
    grad_scale_func = getattr(config, "grad_scale_func", None)
    one = torch.tensor(1.0)  # 0-dim: it multiplies aux-loss gradients on any device
    loss_scale = grad_scale_func(one) if grad_scale_func is not None else one
    cp_size = parallel_state.get_context_parallel_world_size()
    MoEAuxLossAutoScaler.set_loss_scale(loss_scale * cp_size / num_microbatches)


def forward_step(
    forward_step_func,
    data_iterator,
    model,
    num_microbatches,
    input_tensor,
    forward_data_store,
    config,
    collect_non_loss_data=False,
    checkpoint_activations_microbatch=None,
    is_first_microbatch=False,
    current_microbatch=None,
    encoder_decoder_xattn=False,
):
    """One micro batch forward; returns (output, num_tokens).

    `input_tensor` holds the previous stage's activations (None on the first stage, which reads the data).
    On the last pipeline stage the output is the loss to backpropagate, scaled for accumulation: a
    `(loss, num_tokens, report)` loss is divided by its tokens and by `num_microbatches` (neither with
    `config.calculate_per_token_loss`: finalize_model_grads divides by the step's tokens instead), a
    `(loss, report)` loss by `num_microbatches`; the report is stored. With `collect_non_loss_data` the
    store gets `loss_func(output, non_loss_data=True)` instead. Elsewhere the output is the activations for
    the next stage and num_tokens is 0. `is_first_microbatch`, `current_microbatch` and
    `encoder_decoder_xattn` are accepted for Megatron's signature and not needed here.
    """
    if input_tensor is not None:
        _set_input_tensor(model, input_tensor)
    with _timed(config, "forward-compute"):
        if checkpoint_activations_microbatch is None:
            output_tensor, loss_func = forward_step_func(data_iterator, model)
        else:
            output_tensor, loss_func = forward_step_func(data_iterator, model, checkpoint_activations_microbatch)
    _set_moe_aux_loss_scale(config, num_microbatches)
    num_tokens = torch.tensor(0, dtype=torch.int)
    if not parallel_state.is_pipeline_last_stage():
        return output_tensor, num_tokens
    if collect_non_loss_data:
        forward_data_store.append(loss_func(output_tensor, non_loss_data=True))
        return output_tensor, num_tokens
    outputs = loss_func(output_tensor)
    if len(outputs) == 3:
        loss, num_tokens, report = outputs
        if not getattr(config, "calculate_per_token_loss", False):
            loss = loss / num_tokens.clamp(min=1) / num_microbatches
    elif len(outputs) == 2:
        loss, report = outputs
        loss = loss / num_microbatches
    else:
        raise ValueError("loss_func must return (loss, num_tokens, report) or (loss, report)")
    forward_data_store.append(report)
    return loss, num_tokens


def backward_step(input_tensor, output_tensor, output_tensor_grad, config) -> Optional[torch.Tensor]:
    """Backward of one micro batch through this stage; returns the gradient of its input (None on the
    first stage). On the last stage `output_tensor` is the loss, scaled first when a loss scale is used."""
    if input_tensor is not None:
        input_tensor.retain_grad()
    grad_scale_func = getattr(config, "grad_scale_func", None)
    if output_tensor_grad is None and grad_scale_func is not None:
        output_tensor = grad_scale_func(output_tensor)
    with _timed(config, "backward-compute"):
        torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    return None if input_tensor is None else input_tensor.grad


def _single_chunk(model, data_iterator, schedule: str):
    """(model, data iterator) of a schedule that runs one model chunk, which may come as a list of one."""
    if isinstance(model, list):
        if len(model) != 1:
            raise ValueError(f"{schedule} runs exactly one model chunk per rank, got {len(model)}")
        model = model[0]
    if isinstance(data_iterator, list):
        data_iterator = data_iterator[0]
    return model, data_iterator


def _finalize(config, model: List[torch.nn.Module], forward_only: bool, total_num_tokens: torch.Tensor) -> None:
    """Complete the gradient reductions; with calculate_per_token_loss also divide by the step's tokens."""
    finalize_model_grads_func = getattr(config, "finalize_model_grads_func", None)
    if finalize_model_grads_func is None or forward_only:
        return
    if getattr(config, "calculate_per_token_loss", False):
        finalize_model_grads_func(model, total_num_tokens)
    else:
        finalize_model_grads_func(model)


def forward_backward_no_pipelining(
    *,
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: Union[torch.nn.Module, List[torch.nn.Module]],
    num_microbatches: int,
    seq_length: int = None,
    micro_batch_size: int = None,
    decoder_seq_length: int = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool = None,
) -> List[dict]:
    """All micro batches through the whole model on this rank, accumulating gradients.

    Gradient reduction is deferred (`no_sync_func`) until the last micro batch, whose backward may overlap
    the reduction; `finalize_model_grads_func` then completes it. `seq_length` and `micro_batch_size` shape
    pipeline messages in the pipelined schedules and are unused here, as are `decoder_seq_length` (encoder-
    decoder models) and `first_val_step` in every schedule. Returns each micro batch's report.
    """
    model, data_iterator = _single_chunk(model, data_iterator, "the no-pipelining schedule")
    config = get_model_config(model)
    no_sync_func = getattr(config, "no_sync_func", None) or contextlib.nullcontext
    forward_data_store = []
    total_num_tokens = torch.tensor(0, dtype=torch.int)

    def run_microbatch():
        nonlocal total_num_tokens
        loss, num_tokens = forward_step(
            forward_step_func, data_iterator, model, num_microbatches, None, forward_data_store, config,
            collect_non_loss_data,
        )
        total_num_tokens += num_tokens
        if not forward_only:
            backward_step(None, loss, None, config)

    with no_sync_func():
        for _ in range(num_microbatches - 1):
            run_microbatch()
    run_microbatch()
    _finalize(config, [model], forward_only, total_num_tokens)
    return forward_data_store


def _require_enough_microbatches(num_microbatches: int, pipeline_size: int, interleaved: bool) -> None:
    if num_microbatches < pipeline_size or (interleaved and num_microbatches % pipeline_size):
        need = "a multiple of" if interleaved else "at least"
        raise ValueError(
            f"{num_microbatches} micro batches per step for {pipeline_size} pipeline stages: the "
            f"{'interleaved ' if interleaved else ''}schedule needs {need} {pipeline_size}; raise "
            "--global-batch-size or lower --micro-batch-size"
        )


def forward_backward_pipelining_without_interleaving(
    *,
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: Union[torch.nn.Module, List[torch.nn.Module]],
    num_microbatches: int,
    seq_length: int = None,
    micro_batch_size: int = None,
    decoder_seq_length: int = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool = None,
) -> List[dict]:
    """1F1B: each stage runs (stages after it) warm-up forwards, then alternates one forward and one
    backward, then drains the remaining backwards. At most `pipeline size` micro batches' activations
    are alive on a stage. Returns the reports (only the last stage has any)."""
    model, data_iterator = _single_chunk(model, data_iterator, "the non-interleaved pipeline schedule")
    config = get_model_config(model)
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    _require_enough_microbatches(num_microbatches, pipeline_size, interleaved=False)
    shape = p2p.pipeline_tensor_shape(config, seq_length, micro_batch_size)
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    no_sync_func = getattr(config, "no_sync_func", None) or contextlib.nullcontext
    num_warmup = min(pipeline_size - parallel_state.get_pipeline_model_parallel_rank() - 1, num_microbatches)
    if forward_only:
        num_warmup = num_microbatches
    num_steady = num_microbatches - num_warmup
    forward_data_store, input_tensors, output_tensors = [], [], []
    total_num_tokens = torch.tensor(0, dtype=torch.int)

    def run_forward(input_tensor):
        nonlocal total_num_tokens
        output, num_tokens = forward_step(
            forward_step_func, data_iterator, model, num_microbatches, input_tensor, forward_data_store, config,
            collect_non_loss_data,
        )
        total_num_tokens += num_tokens
        if not forward_only:
            input_tensors.append(input_tensor)
            output_tensors.append(output)
        return output

    def run_backward(output_tensor_grad):
        return backward_step(input_tensors.pop(0), output_tensors.pop(0), output_tensor_grad, config)

    with no_sync_func():
        for _ in range(num_warmup):
            output = run_forward(p2p.recv_forward(shape, config, first))
            p2p.send_forward(output, config, last)
        input_tensor = p2p.recv_forward(shape, config, first) if num_steady else None
        for index in range(num_steady):
            output = run_forward(input_tensor)
            if forward_only:
                p2p.send_forward(output, config, last)
                if index < num_steady - 1:
                    input_tensor = p2p.recv_forward(shape, config, first)
                continue
            output_tensor_grad = p2p.send_forward_recv_backward(output, shape, config, last)
            if index == num_steady - 1 and num_warmup == 0:
                break  # this last backward runs outside no_sync, below
            input_tensor_grad = run_backward(output_tensor_grad)
            if index == num_steady - 1:
                p2p.send_backward(input_tensor_grad, config, first)
            else:
                input_tensor = p2p.send_backward_recv_forward(input_tensor_grad, shape, config, first)
        if not forward_only and num_warmup:
            for _ in range(num_warmup - 1):
                p2p.send_backward(run_backward(p2p.recv_backward(shape, config, last)), config, first)
            output_tensor_grad = p2p.recv_backward(shape, config, last)
    if not forward_only:
        # The last backward of the step may overlap the data-parallel gradient reduction.
        p2p.send_backward(run_backward(output_tensor_grad), config, first)
    _finalize(config, [model], forward_only, total_num_tokens)
    return forward_data_store


def forward_backward_pipelining_with_interleaving(
    *,
    forward_step_func: Callable,
    data_iterator: Union[Iterator, List[Iterator]],
    model: List[torch.nn.Module],
    num_microbatches: int,
    seq_length: int = None,
    micro_batch_size: int = None,
    decoder_seq_length: int = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: bool = None,
) -> List[dict]:
    """Interleaved 1F1B: each stage holds several model chunks (virtual stages); micro batches go through
    the chunks in groups of `pipeline size`, which shrinks the pipeline bubble by the number of chunks."""
    if not isinstance(model, list) or len(model) < 2:
        raise ValueError("the interleaved schedule needs the list of this stage's model chunks")
    num_chunks = len(model)
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    pipeline_rank = parallel_state.get_pipeline_model_parallel_rank()
    _require_enough_microbatches(num_microbatches, pipeline_size, interleaved=True)
    config = get_model_config(model[0])
    shape = p2p.pipeline_tensor_shape(config, seq_length, micro_batch_size)
    iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator] * num_chunks
    first_rank = pipeline_rank == 0
    last_rank = pipeline_rank == pipeline_size - 1
    total = num_microbatches * num_chunks
    all_warmup = forward_only or num_microbatches == pipeline_size
    num_warmup = total if all_warmup else min((pipeline_size - pipeline_rank - 1) * 2 + (num_chunks - 1) * pipeline_size, total)
    num_steady = total - num_warmup
    forward_data_store = []
    total_num_tokens = torch.tensor(0, dtype=torch.int)
    input_tensors = [[] for _ in range(num_chunks)]
    output_tensors = [[] for _ in range(num_chunks)]
    output_tensor_grads = [[] for _ in range(num_chunks)]

    def chunk_of(step: int, forward: bool) -> int:
        chunk = (step % (pipeline_size * num_chunks)) // pipeline_size
        return chunk if forward else num_chunks - 1 - chunk

    def is_first(chunk: int) -> bool:
        return parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=chunk)

    def is_last(chunk: int) -> bool:
        return parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=chunk)

    def run_forward(step: int):
        nonlocal total_num_tokens
        chunk = chunk_of(step, forward=True)
        parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
        if is_first(chunk) and len(input_tensors[chunk]) == len(output_tensors[chunk]):
            input_tensors[chunk].append(None)
        input_tensor = input_tensors[chunk][-1]
        output, num_tokens = forward_step(
            forward_step_func, iterators[chunk], model[chunk], num_microbatches, input_tensor, forward_data_store,
            config, collect_non_loss_data,
        )
        total_num_tokens += num_tokens
        output_tensors[chunk].append(output)
        if forward_only:
            input_tensors[chunk].pop()
            output_tensors[chunk].pop()
        return None if is_last(chunk) else output

    def run_backward(step: int):
        chunk = chunk_of(step, forward=False)
        parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)
        if is_last(chunk) and not output_tensor_grads[chunk]:
            output_tensor_grads[chunk].append(None)
        grad = backward_step(
            input_tensors[chunk].pop(0), output_tensors[chunk].pop(0), output_tensor_grads[chunk].pop(0), config
        )
        return None if is_first(chunk) else grad

    def exchange(output, input_grad, recv_prev: bool, recv_next: bool):
        return p2p.send_forward_backward_recv_forward_backward(output, input_grad, recv_prev, recv_next, shape, config)

    no_sync_func = getattr(config, "no_sync_func", None) or contextlib.nullcontext
    with no_sync_func():
        parallel_state.set_virtual_pipeline_model_parallel_rank(0)
        input_tensors[0].append(p2p.recv_forward(shape, config, is_first(0)))
        for step in range(num_warmup):
            output = run_forward(step)
            next_chunk = chunk_of(step + 1, forward=True)
            recv_prev = not (first_rank and next_chunk == 0) and step != total - 1
            recv_next = step == num_warmup - 1 and not all_warmup and not last_rank
            input_tensor, output_tensor_grad = exchange(output, None, recv_prev, recv_next)
            if step == num_warmup - 1 and not all_warmup:
                output_tensor_grads[num_chunks - 1].append(output_tensor_grad)
            input_tensors[next_chunk].append(input_tensor)
        for index in range(num_steady):
            forward_step_index = index + num_warmup
            output = run_forward(forward_step_index)
            input_grad = run_backward(index)
            if first_rank:
                next_forward_chunk = chunk_of(forward_step_index - (pipeline_size - 1), forward=True)
                recv_prev = next_forward_chunk != num_chunks - 1
                next_forward_chunk += 1
            else:
                next_forward_chunk = chunk_of(forward_step_index + 1, forward=True)
                recv_prev = True
            if last_rank:
                next_backward_chunk = chunk_of(index - (pipeline_size - 1), forward=False)
                recv_next = next_backward_chunk != 0
                next_backward_chunk -= 1
            else:
                next_backward_chunk = chunk_of(index + 1, forward=False)
                recv_next = True
            if index == num_steady - 1:
                recv_prev = False
            input_tensor, output_tensor_grad = exchange(output, input_grad, recv_prev, recv_next)
            if recv_prev:
                input_tensors[next_forward_chunk].append(input_tensor)
            if recv_next:
                output_tensor_grads[next_backward_chunk].append(output_tensor_grad)
        if not forward_only:
            if all_warmup:
                output_tensor_grads[num_chunks - 1].append(p2p.recv_backward(shape, config, last_rank))
            for step in range(num_steady, total):
                input_grad = run_backward(step)
                next_chunk = chunk_of(step + 1, forward=False)
                recv_next = not (last_rank and next_chunk == num_chunks - 1) and step != total - 1
                _, output_tensor_grad = exchange(None, input_grad, False, recv_next)
                output_tensor_grads[next_chunk].append(output_tensor_grad)
    parallel_state.set_virtual_pipeline_model_parallel_rank(0)
    _finalize(config, model, forward_only, total_num_tokens)
    return forward_data_store
