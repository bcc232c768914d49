"""Small helpers of the training layer: rank-aware printing, model unwrapping, norms, memory, device peaks."""

import resource
import sys
from datetime import datetime

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.errors import UserError
from megatron.core.transformer.context_parallel_attention import load_balanced_indices
from megatron.training.global_vars import get_args


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


# What each pipeline stage reads from a batch (a middle stage reads nothing), and each field's dtype.
_BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "attention_mask": torch.bool,
    "position_ids": torch.int64,
}
_FIRST_STAGE_FIELDS = ("tokens", "attention_mask", "position_ids")
_LAST_STAGE_FIELDS = ("labels", "loss_mask", "attention_mask")


def _batch_fields_of_this_stage():
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    last_fields = _LAST_STAGE_FIELDS
    if getattr(get_args(), "mtp_num_layers", None):
        last_fields += ("tokens", "position_ids")  # multi-token prediction embeds tokens on the last stage
    return [name for name in _BATCH_DTYPES if (first and name in _FIRST_STAGE_FIELDS) or (last and name in last_fields)]


def get_batch_on_this_tp_rank(data_iterator) -> dict:
    """The next micro batch on this rank's device: tensor-parallel rank 0 reads it and broadcasts it to the
    other tensor-parallel ranks (which hold no data iterator). Fields the pipeline stage does not use are
    None, as is attention_mask without --create-attention-mask-in-dataloader (Megatron-LM's contract)."""
    args = get_args()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    shapes = {name: (args.micro_batch_size, args.seq_length) for name in _BATCH_DTYPES}
    shapes["attention_mask"] = (args.micro_batch_size, 1, args.seq_length, args.seq_length)
    fields = _batch_fields_of_this_stage()
    awaited = _fields_broadcast(fields, args)
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        data = next(data_iterator)
        batch = {
            name: data[name].to(device, _BATCH_DTYPES[name], non_blocking=True) if data.get(name) is not None else None
            for name in _BATCH_DTYPES
        }
    else:
        batch = {
            name: torch.empty(shapes[name], dtype=_BATCH_DTYPES[name], device=device) if name in awaited else None
            for name in _BATCH_DTYPES
        }
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        _check_nothing_awaited_is_missing(batch, awaited)
        for name in awaited:
            dist.broadcast(
                batch[name],
                parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
    return {name: batch[name] if name in fields else None for name in _BATCH_DTYPES}


def _fields_broadcast(fields, args) -> list:
    """What tensor-parallel rank 0 sends the others: this stage's fields, the attention mask only when the data
    loader builds one (--create-attention-mask-in-dataloader)."""
    return [name for name in fields if name != "attention_mask" or args.create_attention_mask_in_dataloader]


def _check_nothing_awaited_is_missing(batch: dict, awaited) -> None:
    """The other tensor-parallel ranks wait for a broadcast of every awaited field: one that tensor-parallel rank
    0's data lacks would leave them waiting forever, so it is an error instead."""
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return
    missing = [name for name in awaited if batch[name] is None]
    if missing:
        hint = "; without an attention mask pass --no-create-attention-mask-in-dataloader" if "attention_mask" in missing else ""
        raise ValueError(f"the micro batch has no {', '.join(missing)}, which the other tensor-parallel ranks wait for{hint}")


def get_batch_on_this_cp_rank(batch: dict) -> dict:
    """This context-parallel rank's part of each sequence: the sequence is cut into 2 x CP chunks and rank r
    keeps chunks r and 2CP-1-r, which balances causal attention work (Megatron-LM's split)."""
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return batch
    cp_rank = parallel_state.get_context_parallel_rank()
    for key, value in batch.items():
        if value is None:
            continue
        seq_dim = 2 if key == "attention_mask" else 1
        kept = load_balanced_indices(value.shape[seq_dim], cp_rank, cp_size, device=value.device)
        batch[key] = value.index_select(seq_dim, kept)
    return batch


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
