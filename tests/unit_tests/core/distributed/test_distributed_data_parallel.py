"""DistributedDataParallel: contiguous gradient buffers and buckets, accumulation, and the data-parallel
average across two gloo processes equal to one process seeing the whole batch."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.model_parallel_config import ModelParallelConfig
from tests.conftest import free_port


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 1))


def _wrap(net, group=None, **ddp_flags):
    return DistributedDataParallel(ModelParallelConfig(), DistributedDataParallelConfig(**ddp_flags), net, data_parallel_group=group)


def _loss(model, x):
    return model(x).square().mean()


def test_main_grads_are_views_of_one_buffer_in_buckets():
    net = _net()
    reference = copy.deepcopy(net)
    model = _wrap(net, bucket_size=25)
    (buffer,) = model.buffers
    assert buffer.grad_data.numel() == sum(p.numel() for p in net.parameters())
    assert len(buffer.buckets) > 1 and sum(b.grad_data.numel() for b in buffer.buckets) == buffer.grad_data.numel()
    for param in net.parameters():
        assert param.main_grad.untyped_storage().data_ptr() == buffer.grad_data.untyped_storage().data_ptr()

    x = torch.randn(8, 6)
    _loss(model, x).backward()
    _loss(reference, x).backward()
    for param, expected in zip(net.parameters(), reference.parameters()):
        assert param.grad is None
        assert torch.equal(param.main_grad, expected.grad)


def test_accumulation_under_no_sync_and_zeroing():
    net = _net()
    reference = copy.deepcopy(net)
    model = _wrap(net)
    x = torch.randn(8, 6)
    with model.no_sync():
        _loss(model, x[:4]).backward()
    _loss(model, x[4:]).backward()
    model.finish_grad_sync()
    _loss(reference, x[:4]).backward()
    _loss(reference, x[4:]).backward()
    for param, expected in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(param.main_grad, expected.grad, rtol=1e-6, atol=1e-7)
    model.zero_grad_buffer()
    assert all(torch.count_nonzero(param.main_grad) == 0 for param in net.parameters())


def test_fp32_gradient_buffer_for_bf16_parameters():
    net = _net().to(torch.bfloat16)
    model = _wrap(net, grad_reduce_in_fp32=True)
    _loss(model, torch.randn(4, 6, dtype=torch.bfloat16)).float().backward()
    assert all(param.main_grad.dtype == torch.float32 for param in net.parameters())


def _two_rank_worker(rank, port, ddp_flags, x, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = _net()
        model = _wrap(net, group=dist.group.WORLD, **ddp_flags)
        half = x[rank * 4 : (rank + 1) * 4]
        with model.no_sync():
            _loss(model, half[:2]).backward()
        _loss(model, half[2:]).backward()
        model.finish_grad_sync()
        results[rank] = [param.main_grad.clone() for param in net.parameters()]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ddp_flags", [{}, {"overlap_grad_reduce": True, "bucket_size": 20}, {"average_in_collective": True}])
def test_two_ranks_average_equals_whole_batch(ddp_flags):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(free_port(), ddp_flags, x, results), nprocs=2, join=True)

    reference = _net()
    # Each rank's loss is a mean over its 2 micro batches of 2 rows, summed over micro batches; the
    # data-parallel average over 2 ranks therefore equals the sum of the 4 micro-batch means / 2.
    for chunk in x.split(2):
        _loss(reference, chunk).backward()
    for rank in (0, 1):
        for ours, expected in zip(results[rank], reference.parameters()):
            torch.testing.assert_close(ours, expected.grad / 2, rtol=1e-5, atol=1e-6)
