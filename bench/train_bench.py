r"""Training speed of one model config: tokens/s, TFLOP/s per device, MFU and peak memory on one final line.

    python bench/train_bench.py --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 [--bf16]
    torchrun --nproc-per-node 2 bench/train_bench.py ...        (any parallel layout the flags allow)

A DeepSeek-V3-style model takes the training flags (examples/mcore/deepseek3/pretrain_deepseek3_tiny_cpu.sh):

    torchrun --nproc-per-node 2 bench/train_bench.py --multi-latent-attention --q-lora-rank 64 --kv-lora-rank 32 \
        --qk-head-dim 32 --qk-pos-emb-head-dim 16 --v-head-dim 32 --qk-layernorm --num-experts 8 \
        --first-k-dense-replace 1 --moe-router-score-function sigmoid --moe-router-enable-expert-bias \
        --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall --mtp-num-layers 1 ...

and its FLOPs count MLA's projections, the active experts only and the prediction depths.

The model is a Llama-style stack by default (RMSNorm, SwiGLU, RoPE, untied embeddings, no biases, a 32000-entry
vocabulary); any training flag overrides it. Batches are random token ids, so the figure is the model step
(forward, backward, optimizer) without the data pipeline. --bench-warmup steps are not timed. MFU needs the
device's peak: --measure-peak times dense matmuls at the run's dtype first (bench/device_peak.py; all ranks at
once, so CPU ranks share the cores as in training), else known GPUs are looked up, else pass
--device-peak-tflops. --profile-dir DIR records the timed steps with torch.profiler (a Chrome trace in DIR) and
prints where the time goes. The line names the allocator and the CPU seconds of this process per step (user
and kernel: page faults show as kernel time; CPU time suffers less than wall time from other jobs on the
cores). Compare jemalloc/tcmalloc with glibc's (MEGATRON_MALLOC=none) by sourcing scripts/fast_allocator.sh:

    bash -c '. scripts/fast_allocator.sh && python bench/train_bench.py ...'

--kernel-floor (one process, dense models) then times the step's matmuls, attention and Adam update alone, in
rounds with one more step and the matmul peak each, and ends the line with step / floor (how far the whole step
is from those kernels run back to back) and the MFU a step at the floor would have: the most any implementation
on these kernels could reach on this machine (bench/kernel_floor.py). With the fused vocabulary head on, it adds
both figures against the floor plus the head's recomputed product: the most this run's algorithm could reach.

"""

import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.training.flops import num_floating_point_operations  # noqa: E402
from megatron.training.global_vars import get_args  # noqa: E402
from megatron.training.initialize import initialize_megatron  # noqa: E402
from megatron.training.training import setup_model_and_optimizer, train_step, update_train_iters  # noqa: E402
from megatron.training.utils import device_peak_tflops, peak_memory_gib, print_rank_0  # noqa: E402
from pretrain_gpt import forward_step, model_provider  # noqa: E402

from device_peak import DTYPES, default_size, measured_matmul_tflops  # noqa: E402
from kernel_floor import HEAD_RECOMPUTATION, DenseGPTKernelFloor, unsupported_reason  # noqa: E402

LLAMA_STYLE_FLAGS = [
    "--normalization", "RMSNorm",
    "--swiglu",
    "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
    "--hidden-dropout", "0.0",
    "--attention-dropout", "0.0",
    "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "31999",
    "--make-vocab-size-divisible-by", "1",
    "--micro-batch-size", "4",
    "--lr", "1e-4",
    "--log-interval", "1000000",
]


def add_bench_args(parser):
    group = parser.add_argument_group(title="benchmark")
    group.add_argument("--bench-iters", type=int, default=10, help="Timed training steps.")
    group.add_argument("--bench-warmup", type=int, default=3, help="Untimed steps before timing.")
    group.add_argument("--profile-dir", type=str, default=None, help="Profile the timed steps into this folder.")
    group.add_argument(
        "--measure-peak", action="store_true", help="MFU against a measured matmul peak (bench/device_peak.py)."
    )
    group.add_argument(
        "--kernel-floor",
        action="store_true",
        help="After the timed steps, time the step's matmuls, attention and Adam update alone (bench/kernel_floor.py) "
        "in rounds with one more step and the matmul peak each; print step / floor and the MFU at the floor.",
    )
    group.add_argument("--kernel-floor-rounds", type=int, default=3, help="Rounds of --kernel-floor.")
    return parser


def random_batches(args):
    """Endless micro batches of uniformly random token ids (the same on every run)."""
    generator = torch.Generator().manual_seed(args.seed)
    causal_mask = torch.ones(args.seq_length, args.seq_length, dtype=torch.bool).triu(1)  # True = masked, as GPTDataset
    while True:
        tokens = torch.randint(0, args.padded_vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=generator)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(args.micro_batch_size, args.seq_length),
            "position_ids": torch.arange(args.seq_length).expand(args.micro_batch_size, -1),
        }
        if args.create_attention_mask_in_dataloader:
            batch["attention_mask"] = causal_mask.expand(args.micro_batch_size, 1, -1, -1)
        yield batch


def synchronize(args):
    if args.device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def allocator_in_use() -> str:
    """jemalloc or tcmalloc when preloaded (scripts/fast_allocator.sh, or LD_PRELOAD by hand), else glibc."""
    with open("/proc/self/maps") as maps:
        libraries = maps.read()
    return next((name for name in ("jemalloc", "tcmalloc") if f"lib{name}" in libraries), "glibc")


def dtype_name(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def measure_peak(args) -> float:
    """Mean over ranks of the matmul peak each rank measures while the others do the same."""
    tflops = measured_matmul_tflops(DTYPES[dtype_name(args)], args.device, default_size(args.device))
    peak = torch.tensor([tflops], dtype=torch.float64, device="cuda" if args.device == "cuda" else "cpu")
    dist.all_reduce(peak)
    return peak.item() / args.world_size


def run_steps(count, model, optimizer, scheduler, batches, profiler=None):
    args = get_args()
    seconds = []
    for _ in range(count):
        synchronize(args)
        start = time.perf_counter()
        train_step(forward_step, batches, model, optimizer, scheduler, args.iteration + 1)
        synchronize(args)
        seconds.append(time.perf_counter() - start)
        args.iteration += 1
        if profiler is not None:
            profiler.step()
    return seconds


def kernel_floor_figures(args, model, optimizer, scheduler, batches) -> str:
    """The line's kernel-floor part (bench/kernel_floor.py): each of --kernel-floor-rounds rounds times one more
    training step, the floor's kernels and the matmul peak in turn, so that the ratios pair timings taken within
    seconds of each other; medians of the floor, its parts, step / floor and the MFU a step at the floor has.
    With the fused vocabulary head on, the same two ratios against the floor plus the head's recomputation: the
    floor of the algorithm this run uses."""
    floor = DenseGPTKernelFloor(args, [parameter.shape for parameter in optimizer.get_parameters()])
    dtype = DTYPES[dtype_name(args)]
    flops = num_floating_point_operations(args, args.global_batch_size)
    rounds = []  # (parts, floor, [(step / floor, MFU at floor)] without and, where timed, with the recomputation)
    for _ in range(args.kernel_floor_rounds):
        (step_seconds,) = run_steps(1, model, optimizer, scheduler, batches)
        parts = floor.time_once()
        peak = measured_matmul_tflops(dtype, args.device, default_size(args.device), repeats=1)
        floor_seconds = sum(seconds for name, seconds in parts.items() if name != HEAD_RECOMPUTATION)
        floors = [floor_seconds]
        if HEAD_RECOMPUTATION in parts:
            floors.append(floor_seconds + parts[HEAD_RECOMPUTATION])
        rounds.append((parts, floor_seconds, [(step_seconds / f, flops / f / 1e12 / peak) for f in floors]))
    median = statistics.median

    def ratios(which: int) -> str:
        return (f"step / floor: {median(r[2][which][0] for r in rounds):.3f} | "
                f"MFU at floor: {100 * median(r[2][which][1] for r in rounds):.2f}%")

    named_parts = ", ".join(f"{name} {median(r[0][name] for r in rounds) * 1000:.1f}" for name in rounds[0][0])
    recomputes = HEAD_RECOMPUTATION in rounds[0][0]
    return (
        f" | kernel floor (ms): {median(r[1] for r in rounds) * 1000:.1f} ({named_parts}"
        + (f"; the floor leaves out {HEAD_RECOMPUTATION}" if recomputes else "")
        + ") | "
        + ratios(0)
        + (f" | with the fused head's recomputation: {ratios(1)}" if recomputes else "")
        + f" (medians of {len(rounds)} rounds)"
    )


def main():
    flags = LLAMA_STYLE_FLAGS + sys.argv[1:]
    if "--train-iters" not in flags and "--train-samples" not in flags:
        flags += ["--train-iters", "1000000"]
    initialize_megatron(add_bench_args, args_list=flags)
    args = get_args()
    update_train_iters(args)
    unsupported = args.kernel_floor and unsupported_reason(args)
    if unsupported:
        sys.exit(f"--kernel-floor: {unsupported}")
    if args.kernel_floor_rounds < 1:
        sys.exit(f"--kernel-floor-rounds must be at least 1, got {args.kernel_floor_rounds}")
    if args.measure_peak:
        synchronize(args)
        args.device_peak_tflops = measure_peak(args)
    model, optimizer, scheduler = setup_model_and_optimizer(model_provider)
    batches = random_batches(args)
    run_steps(args.bench_warmup, model, optimizer, scheduler, batches)
    start_cpu_times = os.times()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if args.profile_dir:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(
            activities=activities,
            on_trace_ready=torch.profiler.tensorboard_trace_handler(args.profile_dir),
        ) as profiler:
            seconds = run_steps(args.bench_iters, model, optimizer, scheduler, batches, profiler)
        sort_key = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
        print_rank_0(profiler.key_averages().table(sort_by=sort_key, row_limit=25))
    else:
        seconds = run_steps(args.bench_iters, model, optimizer, scheduler, batches)
    cpu_times = os.times()

    step_seconds = sum(seconds) / len(seconds)
    tokens_per_second = args.global_batch_size * args.seq_length / step_seconds
    tflops_per_device = num_floating_point_operations(args, args.global_batch_size) / step_seconds / 1e12 / args.world_size
    peak = device_peak_tflops(args)
    mfu = f"{100.0 * tflops_per_device / peak:.2f}%" if peak else "n/a (pass --device-peak-tflops)"
    memory = torch.tensor([peak_memory_gib(args.device)], device="cuda" if args.device == "cuda" else "cpu")
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    floor = ""
    if args.kernel_floor:  # after the peak memory, which its tensors would raise
        floor = kernel_floor_figures(args, model, optimizer, scheduler, batches)
    print_rank_0(
        f"train_bench | {args.num_layers} layers x hidden {args.hidden_size}, seq {args.seq_length}, {dtype_name(args)}, "
        f"global batch {args.global_batch_size}, {args.world_size} x {args.device} | step (ms): {step_seconds * 1000:.1f} | "
        f"tokens/s: {tokens_per_second:.1f} | TFLOP/s per device: {tflops_per_device:.4f} | MFU: {mfu} "
        f"(peak {peak or 0.0:.4f} TFLOP/s) | "
        f"peak memory (GiB): {memory.item():.3f} | allocator: {allocator_in_use()} | "
        f"CPU s per step, user + kernel: {(cpu_times.user - start_cpu_times.user) / args.bench_iters:.2f} + "
        f"{(cpu_times.system - start_cpu_times.system) / args.bench_iters:.2f}{floor}"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
