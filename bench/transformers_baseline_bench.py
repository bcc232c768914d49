r"""Our training step against a plain Hugging Face loop on the same shapes, side by side in one run.

    python bench/transformers_baseline_bench.py --num-layers 4 --hidden-size 256 --seq-length 256 --micro-batch-size 8
    python bench/transformers_baseline_bench.py --num-layers 8 --hidden-size 512 --seq-length 512 --micro-batch-size 4 --bf16

The baseline is `transformers`' LlamaForCausalLM (SDPA attention, untied embeddings, no biases) trained with
`torch.optim.AdamW` (torch's default implementation) on random token ids, in fp32 or under bf16 autocast with
`--bf16`; ours is bench/train_bench.py (the training loop's own step: forward, backward, optimizer) at the same
sizes (vocabulary 32000, SwiGLU width --ffn-hidden-size, one process); any other flag (--torch-compile-fusions, say)
goes to ours only and is named on the last line. Each prints tokens/s over the same number of timed steps after
the same warm-up. Timings on a shared or virtual machine drift by 10-30% between identical runs, so the two
alternate for --rounds rounds (which goes first alternates too); the last line gives the median tokens/s of each,
the median of the per-round ratios, and the same in CPU time per step. With --kernel-floor (passed to ours), it
adds our step / kernel floor and the ratio a step as fast as that floor would reach: the most any implementation
on the same kernels could get against this baseline on this machine; then the same for the floor plus our fused
vocabulary head's recomputed product, the most our algorithm could get.
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 32000


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-attention-heads", type=int, default=None, help="Default: hidden size / 64.")
    parser.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 8/3 x hidden, a multiple of 64.")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 for both (autocast for the baseline).")
    parser.add_argument("--bench-iters", type=int, default=8)
    parser.add_argument("--bench-warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating runs of each; medians are reported.")
    args, args.train_bench_flags = parser.parse_known_args()  # other flags go to train_bench.py (our side only)
    args.num_attention_heads = args.num_attention_heads or max(1, args.hidden_size // 64)
    args.ffn_hidden_size = args.ffn_hidden_size or -(-8 * args.hidden_size // 3 // 64) * 64
    return args


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def transformers_tokens_per_second(args):
    """(tokens/s, CPU seconds per step) of the baseline loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden_size, intermediate_size=args.ffn_hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads, max_position_embeddings=args.seq_length,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    tokens = torch.randint(0, VOCAB, (args.micro_batch_size, args.seq_length))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.bench_warmup):
        step()
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    for _ in range(args.bench_iters):
        step()
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    return args.bench_iters * args.micro_batch_size * args.seq_length / elapsed, cpu / args.bench_iters


def our_tokens_per_second(args):
    """(tokens/s, CPU seconds per step, step / kernel floor or None) of train_bench.py."""
    command = [
        sys.executable, os.path.join(REPO_ROOT, "bench", "train_bench.py"),
        "--num-layers", args.num_layers, "--hidden-size", args.hidden_size,
        "--num-attention-heads", args.num_attention_heads, "--ffn-hidden-size", args.ffn_hidden_size,
        "--seq-length", args.seq_length, "--max-position-embeddings", args.seq_length,
        "--micro-batch-size", args.micro_batch_size, "--global-batch-size", args.micro_batch_size,
        "--bench-iters", args.bench_iters, "--bench-warmup", args.bench_warmup, "--device", "cpu",
        *(["--bf16"] if args.bf16 else []), *args.train_bench_flags,
    ]
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        sys.exit(f"train_bench.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    figure = re.search(r"tokens/s: ([\d.]+).*user \+ kernel: ([\d.]+) \+ ([\d.]+)", result.stdout)
    if not figure:
        sys.exit(f"train_bench.py printed no tokens/s:\n{result.stdout[-2000:]}")
    print(result.stdout.strip().splitlines()[-1])
    floors = [float(floor) for floor in re.findall(r"step / floor: ([\d.]+)", result.stdout)]
    return float(figure.group(1)), float(figure.group(2)) + float(figure.group(3)), floors


def kernel_floor_ceiling(ours, theirs) -> str:
    """With --kernel-floor passed to ours: the median ratio a step as fast as its kernel floor would reach (our
    tokens/s x step / floor over transformers', per round): the most any implementation on these kernels could;
    then the same against the floor plus the fused head's recomputation, the most our algorithm could."""
    figures = []
    for which, name in enumerate(["kernel floor", "floor with the head's recomputation"][: len(ours[0][2])]):
        ceilings = [mine[0] * mine[2][which] / baseline[0] for mine, baseline in zip(ours, theirs)]
        figures.append(f"our step / {name} {statistics.median(mine[2][which] for mine in ours):.2f}, a step at it "
                       f"would be {statistics.median(ceilings):.2f}x transformers")
    return "".join("; " + figure for figure in figures)


def main() -> int:
    args = parse_args()
    ours, theirs = [], []  # (tokens/s, CPU s per step) per round
    for round_index in range(args.rounds):
        runs = [(ours, our_tokens_per_second), (theirs, transformers_tokens_per_second)]
        for results, run in runs if round_index % 2 == 0 else runs[::-1]:
            results.append(run(args))
        print(f"round {round_index + 1}: ours {ours[-1][0]:.0f} tokens/s, transformers {theirs[-1][0]:.0f} tokens/s, "
              f"ratio {ours[-1][0] / theirs[-1][0]:.2f}x", flush=True)
    shape = (
        f"{args.num_layers} layers x hidden {args.hidden_size} (ffn {args.ffn_hidden_size}, {args.num_attention_heads} "
        f"heads), seq {args.seq_length}, micro batch {args.micro_batch_size}, vocab {VOCAB}, "
        f"{'bf16' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    if args.train_bench_flags:  # a figure quoted from this line says what ours ran with
        shape += f", our extra flags: {' '.join(args.train_bench_flags)}"
    speed_ratio = statistics.median(mine[0] / baseline[0] for mine, baseline in zip(ours, theirs))
    cpu_ratio = statistics.median(baseline[1] / mine[1] for mine, baseline in zip(ours, theirs))
    print(f"vs transformers [{shape}]: ours {statistics.median(r[0] for r in ours):.0f} tokens/s "
          f"({statistics.median(r[1] for r in ours):.2f} CPU s/step), LlamaForCausalLM+AdamW "
          f"{statistics.median(r[0] for r in theirs):.0f} tokens/s ({statistics.median(r[1] for r in theirs):.2f} CPU "
          f"s/step), ratio {speed_ratio:.2f}x (CPU time {cpu_ratio:.2f}x)"
          + kernel_floor_ceiling(ours, theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
