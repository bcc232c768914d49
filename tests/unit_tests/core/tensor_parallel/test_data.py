"""Tensor-parallel rank 0's data reaching the other rank (broadcast_data, get_batch_on_this_tp_rank) and the
frozen-weight linear's input gradient, on 2 gloo ranks."""

from types import SimpleNamespace

import pytest
import torch

from megatron.core.tensor_parallel import broadcast_data, linear_with_frozen_weight
from megatron.training.global_vars import set_args
from megatron.training.utils import get_batch_on_this_tp_rank


def _batch():
    tokens = torch.arange(8).view(2, 4)
    return {
        "tokens": tokens,
        "labels": tokens + 1,
        "loss_mask": torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]]),
        "position_ids": torch.arange(4).repeat(2, 1),
    }


def _check(rank):
    mine = {key: value if rank == 0 else torch.zeros_like(value) for key, value in _batch().items()}
    received = broadcast_data(["tokens", "position_ids"], mine, torch.int64)
    assert torch.equal(received["tokens"], _batch()["tokens"]) and received["position_ids"].shape == (2, 4)

    set_args(SimpleNamespace(device="cpu", micro_batch_size=2, seq_length=4, create_attention_mask_in_dataloader=False))
    batch = get_batch_on_this_tp_rank(iter([_batch()]) if rank == 0 else None)
    assert list(batch) == ["tokens", "labels", "loss_mask", "attention_mask", "position_ids"]
    assert batch["attention_mask"] is None
    for key, value in _batch().items():
        assert torch.equal(batch[key], value.to(batch[key].dtype)), key

    # A field the other rank waits for but rank 0's data lacks is an error there, not a hang.
    set_args(SimpleNamespace(device="cpu", micro_batch_size=2, seq_length=4, create_attention_mask_in_dataloader=True))
    if rank == 0:
        with pytest.raises(ValueError, match="no attention_mask.*--no-create-attention-mask-in-dataloader"):
            get_batch_on_this_tp_rank(iter([_batch()]))
    set_args(None)

    # Each rank holds half the output features of a frozen weight; the input gradient sums both halves.
    weight = torch.full((1, 3), float(rank + 1), requires_grad=True)
    inputs = torch.ones(2, 3, requires_grad=True)
    linear_with_frozen_weight(inputs, weight, None, False, True, False).sum().backward()
    assert weight.grad is None
    assert torch.equal(inputs.grad, torch.full((2, 3), 3.0))


def test_tensor_parallel_rank_0_data_reaches_the_other_rank(run_on_gloo):
    run_on_gloo(2, _check, tensor_parallel_size=2)
