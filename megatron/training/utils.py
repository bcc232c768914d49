"""Small helpers of the training layer: rank-aware printing, model unwrapping, norms, memory, device peaks."""

import resource
import sys
from datetime import datetime

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.errors import UserError


class TrainingError(UserError, RuntimeError):
    """Training cannot continue (e.g. a NaN loss); the message names the iteration and what to try."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_last_rank() -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == dist.get_world_size() - 1


def print_line(message: str) -> None:
    """Print with its newline in one write, so lines of several ranks sharing a terminal never interleave."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def print_rank_0(message: str) -> None:
    """Print once per job, from global rank 0."""
    if _rank() == 0:
        print_line(message)


def print_rank_last(message: str) -> None:
    """Print from the last rank, which holds the loss when the model is pipelined."""
    if is_last_rank():
        print_line(message)


def print_datetime(label: str) -> None:
    """A timestamped progress line, after all ranks reached it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    print_rank_0(f"[{label}] datetime: {datetime.now().strftime('%Y-%m-%d %H:%M:%S')} ")


def print_error(message: str) -> None:
    """One clear error line on stderr, prefixed with the rank when there are several."""
    prefix = f"[rank {_rank()}] " if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else ""
    print(f"{prefix}error: {message}", file=sys.stderr, flush=True)


def unwrap_model(model):
    """The model inside wrappers (DDP, ...) that hold it as `.module`; lists are unwrapped element-wise."""
    if isinstance(model, list):
        return [unwrap_model(chunk) for chunk in model]
    while hasattr(model, "module"):
        model = model.module
    return model


def calc_params_l2_norm(model) -> float:
    """L2 norm of the weights, each tensor-parallel shard counted once, summed over model-parallel ranks."""
    squares = torch.zeros(1, dtype=torch.float32)
    for chunk in model if isinstance(model, list) else [model]:
        for param in chunk.parameters():
            if getattr(param, "shared", False) or not param_is_not_tensor_parallel_duplicate(param):
                continue
            squares += torch.linalg.vector_norm(param.detach(), dtype=torch.float32).cpu() ** 2
    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        squares = squares.to(device)
        dist.all_reduce(squares, group=group)
    return squares.item() ** 0.5


def peak_memory_gib(device: str) -> float:
    """Peak memory of this process in GiB: allocated tensors on CUDA, resident set size on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def report_memory(label: str, device: str) -> None:
    """Megatron-LM's memory line, once per rank."""
    if device == "cuda":
        mib = 2**20
        line = (
            f"memory (MB) | allocated: {torch.cuda.memory_allocated() / mib} | max allocated: "
            f"{torch.cuda.max_memory_allocated() / mib} | reserved: {torch.cuda.memory_reserved() / mib} | "
            f"max reserved: {torch.cuda.max_memory_reserved() / mib}"
        )
    else:
        line = f"memory (MB) | max resident: {peak_memory_gib('cpu') * 1024:.1f}"
    print_line(f"[Rank {_rank()}] {label} {line}")


# Dense (no sparsity) peak TFLOP/s of one device by name fragment and dtype, from the vendors' data sheets.
# fp32 means plain fp32 math (TF32 tensor cores are off by default in torch matmuls).
DEVICE_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H20": {"bf16": 148.0, "fp16": 148.0, "fp32": 44.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
}


def device_peak_tflops(args) -> float:
    """Peak TFLOP/s of one device for the run's dtype: --device-peak-tflops, else the table, else None."""
    if args.device_peak_tflops is not None:
        return args.device_peak_tflops
    if args.device != "cuda":
        return None
    dtype = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    name = torch.cuda.get_device_name()
    for fragment, peaks in DEVICE_PEAK_TFLOPS.items():
        if fragment in name:
            return peaks.get(dtype)
    return None
