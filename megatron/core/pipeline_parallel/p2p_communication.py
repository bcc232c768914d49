"""Point-to-point messages between adjacent pipeline stages: activations go to the next stage, their
gradients come back from it.

Every exchange of one schedule step is posted as one batch of isend/irecv and waited for together, so two
stages that send to each other at the same step cannot deadlock. Activations and gradients carry different
tags (gloo matches on them); their posting order is the same on every rank (NCCL matches by order).
"""

from typing import Optional, Tuple

import torch

from megatron.core import parallel_state

_ACTIVATION_TAG = 1
_GRADIENT_TAG = 2


def pipeline_tensor_shape(config, seq_length: int, micro_batch_size: int) -> Tuple[int, int, int]:
    """[s, b, h] of the hidden states passed between stages (s divided by CP, and by TP under sequence
    parallelism)."""
    if seq_length is None or micro_batch_size is None:
        raise ValueError("pipeline schedules need seq_length and micro_batch_size to shape stage messages")
    seq_length //= parallel_state.get_context_parallel_world_size()
    if config.sequence_parallel:
        seq_length //= parallel_state.get_tensor_model_parallel_world_size()
    return (seq_length, micro_batch_size, config.hidden_size)


def _message_device() -> torch.device:
    """NCCL moves CUDA tensors, gloo CPU ones."""
    if torch.distributed.get_backend(parallel_state.get_pipeline_model_parallel_group()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _message_dtype(config) -> torch.dtype:
    return getattr(config, "pipeline_dtype", None) or config.params_dtype


def _communicate(
    *,
    tensor_send_next: Optional[torch.Tensor] = None,
    tensor_send_prev: Optional[torch.Tensor] = None,
    recv_prev: bool = False,
    recv_next: bool = False,
    tensor_shape=None,
    config,
):
    """Send to / receive from the neighbouring stages in one batch; returns (from previous, from next)."""
    received_prev = received_next = None
    make = dict(dtype=_message_dtype(config), device=_message_device())
    group = parallel_state.get_pipeline_model_parallel_group()
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
    isend, irecv, P2POp = torch.distributed.isend, torch.distributed.irecv, torch.distributed.P2POp
    ops = []
    if tensor_send_next is not None:
        ops.append(P2POp(isend, tensor_send_next.contiguous(), next_rank, group, _ACTIVATION_TAG))
    if recv_prev:
        received_prev = torch.empty(tensor_shape, **make)
        ops.append(P2POp(irecv, received_prev, prev_rank, group, _ACTIVATION_TAG))
    if tensor_send_prev is not None:
        ops.append(P2POp(isend, tensor_send_prev.contiguous(), prev_rank, group, _GRADIENT_TAG))
    if recv_next:
        received_next = torch.empty(tensor_shape, **make)
        ops.append(P2POp(irecv, received_next, next_rank, group, _GRADIENT_TAG))
    if ops:
        for request in torch.distributed.batch_isend_irecv(ops):
            request.wait()
    if received_prev is not None:
        # A leaf that collects the gradient to send back.
        received_prev.requires_grad_()
    return received_prev, received_next


def recv_forward(tensor_shape, config, is_first_stage: bool):
    """The previous stage's activations (None on the first stage)."""
    if is_first_stage:
        return None
    return _communicate(recv_prev=True, tensor_shape=tensor_shape, config=config)[0]


def recv_backward(tensor_shape, config, is_last_stage: bool):
    """The gradient of this stage's output, from the next stage (None on the last stage)."""
    if is_last_stage:
        return None
    return _communicate(recv_next=True, tensor_shape=tensor_shape, config=config)[1]


def send_forward(output_tensor, config, is_last_stage: bool) -> None:
    if not is_last_stage:
        _communicate(tensor_send_next=output_tensor, config=config)


def send_backward(input_tensor_grad, config, is_first_stage: bool) -> None:
    if not is_first_stage:
        _communicate(tensor_send_prev=input_tensor_grad, config=config)


def send_forward_recv_backward(output_tensor, tensor_shape, config, is_last_stage: bool):
    """Send activations on and wait for their gradient, in one exchange (None on the last stage)."""
    if is_last_stage:
        return None
    return _communicate(tensor_send_next=output_tensor, recv_next=True, tensor_shape=tensor_shape, config=config)[1]


def send_backward_recv_forward(input_tensor_grad, tensor_shape, config, is_first_stage: bool):
    """Send a gradient back and receive the next activations, in one exchange (None on the first stage)."""
    if is_first_stage:
        return None
    return _communicate(tensor_send_prev=input_tensor_grad, recv_prev=True, tensor_shape=tensor_shape, config=config)[0]


def send_forward_backward_recv_forward_backward(
    output_tensor, input_tensor_grad, recv_prev: bool, recv_next: bool, tensor_shape, config
):
    """The interleaved schedule's exchange: any of the four messages, all in one batch."""
    return _communicate(
        tensor_send_next=output_tensor,
        tensor_send_prev=input_tensor_grad,
        recv_prev=recv_prev,
        recv_next=recv_next,
        tensor_shape=tensor_shape,
        config=config,
    )
