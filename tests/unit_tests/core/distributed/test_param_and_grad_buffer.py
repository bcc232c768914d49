"""Gradient buffers for the distributed optimizer: buckets padded to the data-parallel size and
reduce-scattered, so each rank's slice holds the data-parallel average (two gloo ranks)."""

import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.model_parallel_config import ModelParallelConfig


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _each_rank_owns_the_average_of_its_slice(rank, overlap_grad_reduce):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    reference = _net()
    reference(x).square().mean().backward()
    expected = torch.cat([param.grad.reshape(-1) for param in reversed(list(reference.parameters()))])

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=True, overlap_grad_reduce=overlap_grad_reduce, bucket_size=7
    )
    model = DistributedDataParallel(
        ModelParallelConfig(), ddp_config, _net(), data_parallel_group=parallel_state.get_data_parallel_group()
    )
    model(x[rank * 4 : (rank + 1) * 4]).square().mean().backward()
    model.finish_grad_sync()
    (buffer,) = model.buffers
    assert len(buffer.buckets) > 1
    unpadded_offsets, offset = {}, 0
    for param in buffer.params:
        unpadded_offsets[param] = offset
        offset += param.numel()
    for bucket in buffer.buckets:
        assert bucket.grad_data.numel() % 2 == 0
        start, end = bucket.shard_range(rank)
        for param in bucket.params:
            param_start, param_end, _ = buffer.param_index_map[param]
            low, high = max(param_start, bucket.offset + start), min(param_end, bucket.offset + end)
            if low < high:
                unpadded = unpadded_offsets[param] + low - param_start
                torch.testing.assert_close(
                    buffer.grad_data[low:high], expected[unpadded : unpadded + high - low], rtol=1e-5, atol=1e-7
                )


def test_reduce_scatter_leaves_each_rank_the_average_of_its_slice(run_on_gloo):
    for overlap_grad_reduce in (False, True):
        run_on_gloo(2, _each_rank_owns_the_average_of_its_slice, overlap_grad_reduce)
