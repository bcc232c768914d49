"""The same tiny model at several parallel layouts: tokens/s, per-rank peak memory and per-rank optimizer
state, one comparable line per layout.

    python bench/parallel_bench.py                 (TP1/PP1, TP2, PP2, DP2, DP2 + distributed optimizer)
    python bench/parallel_bench.py --layouts dp2 dp2-distopt --bench-iters 20

Each layout runs under torchrun on loopback (gloo on CPU, NCCL on GPUs) through bench/train_bench.py's
random-token training step. Optimizer state is counted per rank as Adam's moments (exp_avg, exp_avg_sq) plus
fp32 master copies where the optimizer keeps them apart from the model's weights; the distributed optimizer
divides the moments by the data-parallel size.
"""

import argparse
import os
import re
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)

MODEL_FLAGS = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
    "--max-position-embeddings", "128", "--micro-batch-size", "2", "--global-batch-size", "16",
    "--use-cpu-initialization",
]
LAYOUTS = {
    "tp1-pp1": (1, []),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2": (2, []),
    "dp2-distopt": (2, ["--use-distributed-optimizer"]),
}
RESULT_LINE = re.compile(r"^parallel_bench_rank (\d+) \| (.*)$", re.MULTILINE)


def optimizer_state_bytes(optimizer, model) -> dict:
    """Adam moments and the fp32 master copies kept apart from the model's own weights, in bytes."""
    model_params = {id(param) for chunk in model for param in chunk.parameters()}
    masters = [param for param in optimizer.get_parameters() if id(param) not in model_params]
    moments = [value for state in optimizer.optimizer.state.values() for value in state.values() if value.dim() > 0]
    size = lambda tensors: sum(tensor.numel() * tensor.element_size() for tensor in tensors)  # noqa: E731
    return {"moments": size(moments), "masters": size(masters)}


def resident_gib(device: str) -> float:
    """Memory held now, the counterpart of peak_memory_gib: allocated tensors on CUDA, resident set on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**30
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def worker(flags):
    """One rank: train_bench's warm-up and timed steps, then this rank's figures on one line (growth_gib: the
    peak over the memory held once the model and optimizer exist, i.e. activations, gradients and Adam state)."""
    sys.path.insert(0, BENCH_DIR)
    import torch.distributed as dist
    import train_bench
    from pretrain_gpt import model_provider
    from megatron.training.global_vars import get_args
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import setup_model_and_optimizer, update_train_iters
    from megatron.training.utils import peak_memory_gib

    initialize_megatron(train_bench.add_bench_args, args_list=train_bench.LLAMA_STYLE_FLAGS + flags + ["--train-iters", "1000000"])
    args = get_args()
    update_train_iters(args)
    model, optimizer, scheduler = setup_model_and_optimizer(model_provider)
    batches = train_bench.random_batches(args)
    before_steps = resident_gib(args.device)
    train_bench.run_steps(args.bench_warmup, model, optimizer, scheduler, batches)
    seconds = train_bench.run_steps(args.bench_iters, model, optimizer, scheduler, batches)
    tokens_per_second = args.global_batch_size * args.seq_length * len(seconds) / sum(seconds)
    state = optimizer_state_bytes(optimizer, model)
    peak = peak_memory_gib(args.device)
    # One write per line: the ranks share the launcher's stdout, and print's separate newline can interleave.
    sys.stdout.write(
        f"parallel_bench_rank {dist.get_rank()} | tokens/s {tokens_per_second:.1f} | peak_gib {peak:.3f} "
        f"| growth_gib {peak - before_steps:.3f} | moments {state['moments']} | masters {state['masters']}\n"
    )
    sys.stdout.flush()
    dist.destroy_process_group()


def run_ranks(nproc, flags, threads=None):
    """The worker on `nproc` ranks under torchrun (OMP_NUM_THREADS `threads`, by default the environment's or
    1): each rank's fields ({"tokens/s": "...", "peak_gib": ...}) in rank order, or the error's last line."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        os.path.abspath(__file__), "--worker", *map(str, flags),
    ]
    threads = str(threads or os.environ.get("OMP_NUM_THREADS", "1"))
    environment = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=REPO_ROOT)
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPO_ROOT)
    ranks = sorted((int(rank), dict(field.split(" ", 1) for field in rest.split(" | "))) for rank, rest in RESULT_LINE.findall(result.stdout))
    if result.returncode != 0 or len(ranks) != nproc:
        return (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
    return [fields for _, fields in ranks]


def per_rank(ranks, key, fmt, scale=1.0) -> str:
    """One figure (times `scale`) of every rank, joined with '/'."""
    return "/".join(fmt.format(float(fields[key]) * scale) for fields in ranks)


def run_layout(name, bench_flags):
    nproc, layout_flags = LAYOUTS[name]
    ranks = run_ranks(nproc, [*MODEL_FLAGS, *layout_flags, *bench_flags])
    if isinstance(ranks, str):
        return f"parallel_bench | {name:12s} | failed: {ranks}"
    return (
        f"parallel_bench | {name:12s} | {nproc} ranks | tokens/s: {float(ranks[0]['tokens/s']):.1f} | "
        f"peak memory per rank (GiB): {per_rank(ranks, 'peak_gib', '{:.3f}')} | "
        f"Adam moments per rank (bytes): {per_rank(ranks, 'moments', '{:.0f}')} | "
        f"fp32 masters per rank (bytes): {per_rank(ranks, 'masters', '{:.0f}')}"
    )


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--bench-iters", default="10")
    parser.add_argument("--bench-warmup", default="2")
    options = parser.parse_args()
    for name in options.layouts:
        print(run_layout(name, ["--bench-iters", options.bench_iters, "--bench-warmup", options.bench_warmup]), flush=True)


if __name__ == "__main__":
    main()
