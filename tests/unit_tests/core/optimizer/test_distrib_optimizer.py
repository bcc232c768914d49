"""The distributed optimizer on two gloo data-parallel ranks against one process with the whole batch and
the unsharded optimizer: same updates and grad norms, half the optimizer state per rank, and a parameter
state gathered at DP2 that continues identically when loaded at DP1."""

import copy

import pytest
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.optimizer import DistributedOptimizer, OptimizerConfig, get_megatron_optimizer, get_param_groups
from megatron.core.optimizer.__init__ import _build_torch_optimizer

STEPS = 3
OPTIMIZER = dict(lr=0.05, weight_decay=0.1, clip_grad=0.3)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 1))


def _batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(8, 6, generator=generator) for _ in range(STEPS)]


def _wrap(net, group, use_distributed_optimizer, bucket_size=17):
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer, bucket_size=bucket_size)
    return DistributedDataParallel(ModelParallelConfig(), ddp_config, net, data_parallel_group=group)


def _train(model, optimizer, batches, rows):
    """A few steps on `rows` of each batch; returns the grad norms."""
    norms = []
    for batch in batches:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        model(batch[rows]).square().mean().backward()
        model.finish_grad_sync()
        _, grad_norm, _ = optimizer.step()
        norms.append(grad_norm)
    return norms


def _unsharded_reference(batches):
    """One process, whole batches, the ordinary optimizer (no process group at all)."""
    net = _net()
    model = _wrap(net, None, use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(OptimizerConfig(**OPTIMIZER), [model])
    norms = _train(model, optimizer, batches, slice(None))
    return net, optimizer, norms


def _state_bytes(optimizer):
    tensors = list(optimizer.get_parameters())
    tensors += [value for state in optimizer.optimizer.state.values() for value in state.values() if value.dim() > 0]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _sharded_matches_unsharded(rank):
    batches = _batches()
    reference_net, reference_optimizer, reference_norms = _unsharded_reference(batches)

    net = _net()
    model = _wrap(net, parallel_state.get_data_parallel_group(), use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(OptimizerConfig(**OPTIMIZER, use_distributed_optimizer=True), [model])
    assert isinstance(optimizer, DistributedOptimizer)
    norms = _train(model, optimizer, batches, slice(rank * 4, (rank + 1) * 4))

    assert norms == [pytest.approx(norm, rel=1e-5) for norm in reference_norms]
    for param, expected in zip(net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)
    # Each rank keeps masters and Adam moments for its half of every (padded) bucket only.
    padding_bytes = sum(len(buffer.buckets) for buffer in model.buffers) * 3 * 4
    assert abs(2 * _state_bytes(optimizer) - _state_bytes(reference_optimizer)) <= 2 * padding_bytes


def test_sharded_step_equals_unsharded_step_with_half_the_state(run_on_gloo):
    run_on_gloo(2, _sharded_matches_unsharded)


def _state_moves_from_two_ranks_to_one(rank):
    """Train 2 steps at DP2, gather; rank 0 loads the gathered state into a DP1 optimizer and the third step
    equals the unsharded run's."""
    solo_groups = [dist.new_group([member]) for member in range(2)]
    batches = _batches()
    reference_net, _, reference_norms = _unsharded_reference(batches)

    net = _net()
    model = _wrap(net, parallel_state.get_data_parallel_group(), use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(OptimizerConfig(**OPTIMIZER, use_distributed_optimizer=True), [model])
    _train(model, optimizer, batches[:2], slice(rank * 4, (rank + 1) * 4))
    gathered = optimizer.gather_parameter_state()
    hyperparameters = optimizer.state_dict()
    if rank != 0:
        assert gathered is None
        return
    solo = solo_groups[rank]
    fresh_net = _net()
    fresh_net.load_state_dict(copy.deepcopy(net.state_dict()))
    fresh_model = _wrap(fresh_net, solo, use_distributed_optimizer=True, bucket_size=None)
    config = OptimizerConfig(**OPTIMIZER, use_distributed_optimizer=True)
    fresh_optimizer = DistributedOptimizer(
        config, [fresh_model], get_param_groups([fresh_model]),
        lambda groups: _build_torch_optimizer(config, groups), None, solo, solo,
    )
    fresh_optimizer.load_state_dict(hyperparameters)
    fresh_optimizer.load_parameter_state(gathered)
    (norm,) = _train(fresh_model, fresh_optimizer, batches[2:], slice(None))
    assert norm == pytest.approx(reference_norms[2], rel=1e-5)
    for param, expected in zip(fresh_net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)


def test_gathered_state_re_partitions_to_another_data_parallel_size(run_on_gloo):
    run_on_gloo(2, _state_moves_from_two_ranks_to_one)


class _TiedHeadNet(torch.nn.Module):
    """The last layer runs with a weight handed to it as an argument, owned by a module whose own forward
    never runs (as a tied output layer is given the word embeddings on the last pipeline stage)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(6, 5)
        self.second = torch.nn.Linear(5, 5)
        self.weight_owner = torch.nn.Linear(5, 1, bias=False)
        self.head = _Projection()

    def forward(self, batch):
        hidden = torch.tanh(self.second(torch.tanh(self.first(batch))))
        return self.head(hidden, self.weight_owner.weight)


class _Projection(torch.nn.Module):
    def forward(self, hidden, weight):
        return torch.nn.functional.linear(hidden, weight)


def _overlapped_gather_matches_unsharded(rank):
    """Updated weights arrive only when the next forward reaches them, yet every step's loss and the final
    weights equal the unsharded run's."""
    batches = _batches()

    def train(model, optimizer, rows, check_deferred=False):
        losses = []
        for batch in batches:
            model.zero_grad_buffer()
            optimizer.zero_grad()
            loss = model(batch[rows]).square().mean()
            loss.backward()
            losses.append(loss.item())
            model.finish_grad_sync()
            before = [param.detach().clone() for param in model.parameters()]
            optimizer.step()
            if check_deferred:
                assert all(torch.equal(old, param) for old, param in zip(before, model.parameters()))
        optimizer.finish_param_sync()
        return losses

    reference_net = _TiedHeadNet()
    reference = _wrap(reference_net, None, use_distributed_optimizer=False)
    reference_losses = train(reference, get_megatron_optimizer(OptimizerConfig(**OPTIMIZER), [reference]), slice(None))

    net = _TiedHeadNet()
    model = _wrap(net, parallel_state.get_data_parallel_group(), use_distributed_optimizer=True, bucket_size=5)
    assert len(model.buffers[0].buckets) > 2
    config = OptimizerConfig(**OPTIMIZER, use_distributed_optimizer=True, overlap_param_gather=True)
    optimizer = get_megatron_optimizer(config, [model])
    losses = train(model, optimizer, slice(rank * 4, (rank + 1) * 4), check_deferred=True)

    # Each rank saw half of each batch: the mean of both halves' losses is the whole batch's loss.
    averaged = torch.tensor(losses)
    dist.all_reduce(averaged)
    assert (averaged / 2).tolist() == pytest.approx(reference_losses, rel=1e-5)
    for param, expected in zip(net.parameters(), reference_net.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)


def test_overlapped_parameter_gather_waits_for_each_weight_at_its_first_use(run_on_gloo):
    run_on_gloo(2, _overlapped_gather_matches_unsharded)


def test_overlapped_parameter_gather_needs_the_distributed_optimizer():
    with pytest.raises(ValueError, match="overlap_param_gather needs use_distributed_optimizer"):
        OptimizerConfig(overlap_param_gather=True)
