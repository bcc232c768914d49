"""The chunked output layer + cross entropy gives the unfused path's losses and gradients, on one and two ranks."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel import cross_entropy
from megatron.core.tensor_parallel.cross_entropy import (
    linear_vocab_parallel_cross_entropy,
    vocab_parallel_cross_entropy,
)

VOCAB, HIDDEN = 40, 8


def _chunks_of_seven_entries():
    """Vocabulary chunks of 7 entries (the last one shorter) instead of megabytes of logits."""
    cross_entropy.MIN_CHUNK_VOCAB = 7
    cross_entropy.CHUNK_LOGITS_BYTES = 0


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_VOCAB", 7)
    monkeypatch.setattr(cross_entropy, "CHUNK_LOGITS_BYTES", 0)


def _inputs(dtype=torch.float32, vocab=VOCAB):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 2, HIDDEN, generator=generator).to(dtype)
    weight = torch.randn(vocab, HIDDEN, generator=generator).to(dtype)
    target = torch.randint(0, vocab, (6, 2), generator=generator)
    # Unequal per-token weights with zeros, as a loss mask and per-token loss averaging produce.
    grad = torch.rand(6, 2, generator=generator) * (torch.rand(6, 2, generator=generator) > 0.3)
    return hidden, weight, target, grad


def _losses_and_gradients(loss_function, hidden, weight, target, grad):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = loss_function(hidden, weight, target)
    loss.backward(grad)
    return loss.detach(), hidden.grad, weight.grad


def _unfused(hidden, weight, target):
    return vocab_parallel_cross_entropy(F.linear(hidden, weight).float(), target)


def test_fused_matches_unfused_in_fp32():
    inputs = _inputs()
    fused = _losses_and_gradients(linear_vocab_parallel_cross_entropy, *inputs)
    unfused = _losses_and_gradients(_unfused, *inputs)
    torch.testing.assert_close(fused[0], _torch_cross_entropy(*inputs[:3]))
    for mine, theirs in zip(fused, unfused):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_fused_matches_unfused_in_bf16():
    """bf16 matmuls, fp32 softmax; the weight gradient is summed over the chunks in fp32, so one bf16 rounding."""
    inputs = _inputs(torch.bfloat16)
    fused = _losses_and_gradients(linear_vocab_parallel_cross_entropy, *inputs)
    unfused = _losses_and_gradients(_unfused, *inputs)
    assert fused[1].dtype == fused[2].dtype == torch.bfloat16
    for mine, theirs in zip(fused, unfused):
        torch.testing.assert_close(mine, theirs, rtol=1.6e-2, atol=1e-2)


def test_only_the_hidden_gradient_when_the_weight_is_frozen():
    hidden, weight, target, grad = _inputs()
    hidden.requires_grad_(True)
    linear_vocab_parallel_cross_entropy(hidden, weight, target).backward(grad)
    expected = hidden.detach().clone().requires_grad_(True)
    _unfused(expected, weight, target).backward(grad)
    torch.testing.assert_close(hidden.grad, expected.grad, rtol=1e-5, atol=1e-6)


def _torch_cross_entropy(hidden, weight, target):
    """The unsplit reference (the vocab-parallel one would all-reduce over the two ranks)."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), target.view(-1), reduction="none").view_as(target)


def _two_rank_worker(rank):
    _chunks_of_seven_entries()  # a spawned rank imports the module afresh
    hidden, weight, target, grad = _inputs()
    local_weight = weight.chunk(2)[rank].clone()
    loss, hidden_grad, weight_grad = _losses_and_gradients(
        linear_vocab_parallel_cross_entropy, hidden, local_weight, target, grad
    )
    expected = _losses_and_gradients(_torch_cross_entropy, hidden, weight, target, grad)
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-6)
    # Each rank's hidden gradient is its vocabulary half's share; the output layer's region mapping sums them.
    summed = hidden_grad.clone()
    torch.distributed.all_reduce(summed)
    torch.testing.assert_close(summed, expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad, expected[2].chunk(2)[rank], rtol=1e-5, atol=1e-6)


def test_two_rank_vocabulary_split_matches_the_whole_vocabulary(run_on_gloo):
    run_on_gloo(2, _two_rank_worker, tensor_parallel_size=2)
