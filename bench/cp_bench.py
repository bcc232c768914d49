"""One small model trained on long sequences at several context-parallel sizes: tokens/s and peak memory per
rank, one line per sequence length, CP size and comm type.

    python bench/cp_bench.py                                   (seq 4096 8192 16384; CP 1, 2, 4; p2p)
    python bench/cp_bench.py --seq-lengths 4096 8192 --cp-sizes 1 2 --comm-types p2p all_gather a2a

Each layout is bench/parallel_bench.py's worker (train_bench's random-token training step: forward, backward,
optimizer) under torchrun on loopback, gloo on CPU (NCCL on GPUs), one sequence per step split over the CP
ranks; the machine's cores are shared out (threads per rank = cores / CP). Per rank: the peak memory (resident
set on CPU) and its growth over the memory held once the model and optimizer exist, which is activations,
gradients and Adam state; for a small model the activations dominate, and they fall with CP.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parallel_bench  # noqa: E402
from parallel_bench import REPO_ROOT  # noqa: E402

sys.path.insert(0, REPO_ROOT)
from megatron.core.transformer.context_parallel_attention import CP_COMM_TYPES  # noqa: E402

# Llama-style (train_bench's defaults) with a small vocabulary, so that attention and the layers' activations,
# not the logits, are what the sequence length grows.
MODEL_FLAGS = [
    "--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4, "--vocab-size", 4096,
    "--micro-batch-size", 1, "--global-batch-size", 1,
]


def run_layout(options, seq_length, cp_size, comm_type) -> str:
    flags = [
        *MODEL_FLAGS, "--seq-length", seq_length, "--max-position-embeddings", seq_length,
        "--context-parallel-size", cp_size, "--cp-comm-type", comm_type,
        "--bench-iters", options.bench_iters, "--bench-warmup", options.bench_warmup,
    ]
    threads = max(1, len(os.sched_getaffinity(0)) // cp_size)
    ranks = parallel_bench.run_ranks(cp_size, flags, threads=threads)
    layout = f"cp_bench | seq {seq_length:6d} | CP {cp_size} | {comm_type if cp_size > 1 else '-':10s}"
    if isinstance(ranks, str):
        return f"{layout} | failed: {ranks}"
    peak, growth = (parallel_bench.per_rank(ranks, key, "{:.0f}", scale=1024) for key in ("peak_gib", "growth_gib"))
    return (
        f"{layout} | tokens/s {float(ranks[0]['tokens/s']):8.1f} | peak memory per rank (MiB) {peak} | "
        f"growth over model and optimizer per rank (MiB) {growth}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--cp-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--comm-types", nargs="+", default=["p2p"], choices=CP_COMM_TYPES)
    parser.add_argument("--bench-iters", type=int, default=2)
    parser.add_argument("--bench-warmup", type=int, default=1)
    options = parser.parse_args()
    for seq_length in options.seq_lengths:
        for cp_size in options.cp_sizes:
            for comm_type in options.comm_types if cp_size > 1 else options.comm_types[:1]:
                print(run_layout(options, seq_length, cp_size, comm_type), flush=True)


if __name__ == "__main__":
    main()
