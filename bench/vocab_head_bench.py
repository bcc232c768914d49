r"""Step time and peak memory of the vocabulary head (output layer + cross entropy, forward and backward),
fused (chunked over the vocabulary) and unfused, one line per vocabulary size and path.

    python bench/vocab_head_bench.py                                  # vocab 32000 and 152064, 8 x 256 tokens
    python bench/vocab_head_bench.py --vocab-sizes 152064 --hidden-size 512 --tokens 2048 --bf16

Each measurement runs in a fresh process, so the peak is that path's own: CUDA's peak allocation, or on CPU
the growth of the peak resident set over what the inputs already occupy.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.tensor_parallel.cross_entropy import (  # noqa: E402
    linear_vocab_parallel_cross_entropy,
    vocab_parallel_cross_entropy,
)


def unfused_head(hidden, weight, target):
    return vocab_parallel_cross_entropy(F.linear(hidden, weight).float(), target)


def resident_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(args) -> str:
    """One path in this process: mean step seconds and the peak memory the head adds."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    generator = torch.Generator(device=args.device).manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden_size, generator=generator, device=args.device) * 0.02).to(dtype)
    hidden = torch.randn(args.tokens, 1, args.hidden_size, generator=generator, device=args.device).to(dtype)
    target = torch.randint(0, args.vocab, (args.tokens, 1), generator=generator, device=args.device)
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    head = linear_vocab_parallel_cross_entropy if args.fused else unfused_head
    baseline = resident_bytes()
    if args.device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for step in range(args.warmup + args.iters):
        start = time.perf_counter()
        head(hidden, weight, target).mean().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
        weight.grad = hidden.grad = None
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_resident_bytes()
    return f"{1000 * sum(seconds) / len(seconds):.1f} {(peak - baseline) / 2**20:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048, help="Tokens per micro batch (micro batch x sequence).")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fused", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vocab is not None:
        print(measure(args))
        return
    shared = [f"--hidden-size={args.hidden_size}", f"--tokens={args.tokens}", f"--device={args.device}",
              f"--iters={args.iters}", f"--warmup={args.warmup}"] + (["--bf16"] if args.bf16 else [])
    dtype = "bf16" if args.bf16 else "fp32"
    for vocab in args.vocab_sizes:
        for fused in (0, 1):
            command = [sys.executable, os.path.abspath(__file__), f"--vocab={vocab}", f"--fused={fused}"] + shared
            milliseconds, mib = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
            print(
                f"vocab_head_bench | vocab {vocab}, hidden {args.hidden_size}, {args.tokens} tokens, {dtype}, "
                f"{args.device} | {'fused  ' if fused else 'unfused'} | step (ms): {milliseconds} | "
                f"peak memory (MiB): {mib}",
                flush=True,
            )


if __name__ == "__main__":
    main()
