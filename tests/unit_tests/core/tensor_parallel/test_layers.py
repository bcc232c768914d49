"""Tensor-parallel layers, collectives and cross entropy: equal to the unsplit computation."""

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_sequence_parallel_region,
    model_parallel_cuda_manual_seed,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from megatron.core.utils import init_method_normal

INIT = init_method_normal(0.5)


def _master_weights(seed, *shapes):
    """The full weights CPU initialisation draws, in construction order."""
    torch.manual_seed(seed)
    weights = []
    for shape in shapes:
        weight = torch.empty(shape)
        INIT(weight)
        weights.append(weight)
    return weights


def _two_layer_mlp(config, gated=False):
    fc1 = ColumnParallelLinear(8, 12, config=config, init_method=INIT, stride=2 if gated else 1)
    fc2 = RowParallelLinear(12, 8, config=config, init_method=INIT, input_is_parallel=True)
    return fc1, fc2


def test_single_rank_layers_match_torch():
    config = ModelParallelConfig(use_cpu_initialization=True)
    torch.manual_seed(3)
    fc1, fc2 = _two_layer_mlp(config)
    w1, w2 = _master_weights(3, (12, 8), (8, 12))
    assert torch.equal(fc1.weight, w1) and torch.equal(fc2.weight, w2)
    x = torch.randn(5, 2, 8)
    hidden, bias = fc1(x)
    output, _ = fc2(hidden)
    assert bias is None
    torch.testing.assert_close(output, F.linear(F.linear(x, w1, fc1.bias), w2, fc2.bias))


def test_skip_bias_add_returns_the_bias_and_tied_weights_are_checked():
    config = ModelParallelConfig(use_cpu_initialization=True)
    layer = ColumnParallelLinear(4, 6, config=config, init_method=INIT, skip_bias_add=True)
    output, bias = layer(torch.ones(3, 4))
    assert bias is layer.bias
    torch.testing.assert_close(output, F.linear(torch.ones(3, 4), layer.weight))
    tied = ColumnParallelLinear(4, 6, config=config, init_method=INIT, bias=False, skip_weight_param_allocation=True)
    with pytest.raises(RuntimeError, match="pass weight="):
        tied(torch.ones(3, 4))
    with pytest.raises(ValueError, match="expecting"):
        tied(torch.ones(3, 4), weight=torch.ones(5, 4))


def test_initialisation_on_the_tensor_parallel_stream_needs_a_seed():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().reset()
    with pytest.raises(RuntimeError, match="model_parallel_cuda_manual_seed"):
        ColumnParallelLinear(4, 6, config=ModelParallelConfig(), init_method=INIT)
    model_parallel_cuda_manual_seed(5)
    first = ColumnParallelLinear(4, 6, config=ModelParallelConfig(), init_method=INIT).weight.detach().clone()
    model_parallel_cuda_manual_seed(5)
    again = ColumnParallelLinear(4, 6, config=ModelParallelConfig(), init_method=INIT).weight
    assert torch.equal(first, again)


def test_tracker_fork_restores_the_default_stream():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    model_parallel_cuda_manual_seed(11)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    assert not torch.equal(inside, expected)


def test_cross_entropy_matches_torch_single_rank():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 11, requires_grad=True)
    target = torch.randint(0, 11, (4, 3))
    loss = vocab_parallel_cross_entropy(logits, target)
    reference_logits = logits.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(reference_logits.reshape(-1, 11), target.reshape(-1), reduction="none").view(4, 3)
    torch.testing.assert_close(loss, reference)
    loss.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def _tensor_parallel_worker(rank, seed, gated, sequence_parallel):
    config = ModelParallelConfig(
        use_cpu_initialization=True, tensor_model_parallel_size=2, sequence_parallel=sequence_parallel
    )
    torch.manual_seed(seed)
    fc1, fc2 = _two_layer_mlp(config, gated)
    w1, w2 = _master_weights(seed, (12, 8), (8, 12))
    if gated:  # [gate; up] split separately: rank r holds [gate_r; up_r]
        expected_w1 = torch.cat([w1[:6].chunk(2)[rank], w1[6:].chunk(2)[rank]])
    else:
        expected_w1 = w1.chunk(2)[rank]
    assert torch.equal(fc1.weight, expected_w1)
    assert torch.equal(fc2.weight, w2.chunk(2, dim=1)[rank])
    if gated:
        x = torch.randn(6, 2, 8)
        torch.testing.assert_close(fc1(x)[0], F.linear(x, expected_w1) + fc1.bias)
        return

    torch.manual_seed(100)
    x = torch.randn(6, 2, 8)
    x_local = x.chunk(2)[rank].clone() if sequence_parallel else x.clone()
    x_local.requires_grad_(True)
    hidden, _ = fc1(x_local)
    output, _ = fc2(hidden)
    expected = F.linear(F.linear(x, w1), w2)
    torch.testing.assert_close(output, expected.chunk(2)[rank] if sequence_parallel else expected)

    # Gradients: the sum over the ranks' outputs must give the unsplit gradients.
    output.sum().backward()
    reference_x = x.clone().requires_grad_(True)
    reference_w1 = w1.clone().requires_grad_(True)
    F.linear(F.linear(reference_x, reference_w1), w2).sum().backward()
    expected_grad = reference_x.grad.chunk(2)[rank] if sequence_parallel else reference_x.grad
    torch.testing.assert_close(x_local.grad, expected_grad)
    torch.testing.assert_close(fc1.weight.grad, reference_w1.grad.chunk(2)[rank])

    embedding = VocabParallelEmbedding(10, 4, init_method=INIT, config=ModelParallelConfig(use_cpu_initialization=True))
    full = torch.cat([torch.zeros(5, 4), torch.ones(5, 4)]) + torch.arange(10.0).unsqueeze(1)
    embedding.weight.data.copy_(full.chunk(2)[rank])
    ids = torch.tensor([[0, 9, 4, 5]])
    torch.testing.assert_close(embedding(ids), F.embedding(ids, full))

    logits = torch.randn(3, 2, 10, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[0, 9], [4, 5], [7, 2]])
    loss = vocab_parallel_cross_entropy(logits.chunk(2, dim=-1)[rank].clone(), target)
    reference = F.cross_entropy(logits.reshape(-1, 10), target.reshape(-1), reduction="none").view(3, 2)
    torch.testing.assert_close(loss, reference)


def _sequence_mappings_worker(rank):
    full = torch.arange(8.0).view(4, 2, 1).requires_grad_(True)
    local = scatter_to_sequence_parallel_region(full)
    assert torch.equal(local, full.detach().chunk(2)[rank])
    gathered = gather_from_sequence_parallel_region(local)
    assert torch.equal(gathered, full.detach())
    summed = reduce_scatter_to_sequence_parallel_region(full * (rank + 1))
    assert torch.equal(summed, 3 * full.detach().chunk(2)[rank])
    assert parallel_state.get_tensor_model_parallel_world_size() == 2


def _layers_worker(rank):
    for gated, sequence_parallel in ((False, False), (True, False), (False, True)):
        _tensor_parallel_worker(rank, 7, gated, sequence_parallel)
    _sequence_mappings_worker(rank)


def test_two_rank_layers_equal_the_unsplit_layers(run_on_gloo):
    """Column/row-parallel linears (plain, gated [gate; up] split, sequence parallel), the vocab-parallel
    embedding and cross entropy, and the sequence-parallel collectives, in one two-rank launch."""
    run_on_gloo(2, _layers_worker, tensor_parallel_size=2)
