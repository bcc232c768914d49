"""Context-parallel attention alone (forward + backward, causal): tokens/s and peak memory per rank at several
sequence lengths and CP sizes, one line per layout.

    python bench/cp_bench.py                                  (seq 2048 4096 8192; CP 1, 2, 4; p2p and all_gather)
    python bench/cp_bench.py --seq-lengths 4096 8192 16384 --cp-sizes 1 2 --comm-types p2p

Every CP size runs as that many gloo processes on CPU sharing the machine's cores (threads per rank =
cores / CP), each holding its 2 load-balanced chunks of q, k, v [s/CP, batch, heads, head_dim]. CP=1 is the
single-process path (torch's causal scaled_dot_product_attention). Peak memory per rank is the growth of the
process's peak resident memory over its resident memory once the inputs exist: what attention and its backward
allocate.
"""

import argparse
import os
import resource
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.transformer.context_parallel_attention import (  # noqa: E402
    CP_COMM_TYPES,
    context_parallel_attention,
    load_balanced_indices,
)


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def attention_step(options, comm_type, inputs, group) -> None:
    """One forward and backward of the attention on this rank's inputs."""
    if group is None:
        query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in inputs)
        output = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    else:
        output = context_parallel_attention(*inputs, group, comm_type)
    output.sum().backward()


def worker(rank, cp_size, rendezvous, options, comm_type, results):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // cp_size))
    group = None
    if cp_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=cp_size)
        group = dist.group.WORLD
    local_length = load_balanced_indices(options.seq_length, rank, cp_size).numel()
    generator = torch.Generator().manual_seed(rank)
    shape = (local_length, options.batch, options.heads, options.head_dim)
    inputs = [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)]
    baseline = resident_mib()
    attention_step(options, comm_type, inputs, group)  # warm-up: allocator and kernels
    if group is not None:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(options.iters):
        attention_step(options, comm_type, inputs, group)
    if group is not None:
        dist.barrier()
    seconds = time.perf_counter() - start
    results[rank] = (seconds, peak_resident_mib() - baseline)
    if group is not None:
        dist.destroy_process_group()


def run_layout(options, seq_length, cp_size, comm_type) -> str:
    options.seq_length = seq_length
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        rendezvous = os.path.join(folder, "rendezvous")
        mp.spawn(worker, args=(cp_size, rendezvous, options, comm_type, results), nprocs=cp_size, join=True)
        per_rank = [results[rank] for rank in range(cp_size)]
    seconds = max(elapsed for elapsed, _ in per_rank)
    tokens_per_second = seq_length * options.batch * options.iters / seconds
    peaks = "/".join(f"{peak:.0f}" for _, peak in per_rank)
    return (
        f"cp_bench | seq {seq_length:6d} | CP {cp_size} | {comm_type:10s} | tokens/s {tokens_per_second:9.0f} | "
        f"peak attention memory per rank (MiB) {peaks}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--comm-types", nargs="+", default=list(CP_COMM_TYPES), choices=CP_COMM_TYPES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--iters", type=int, default=1)
    options = parser.parse_args()
    for seq_length in options.seq_lengths:
        for cp_size in options.cp_sizes:
            for comm_type in ["sdpa"] if cp_size == 1 else options.comm_types:
                print(run_layout(options, seq_length, cp_size, comm_type), flush=True)


if __name__ == "__main__":
    main()
