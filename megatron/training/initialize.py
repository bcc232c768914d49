"""Start a run: parse and validate flags, form the process groups, seed every random generator.

Works under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the environment) and as a
plain single `python` process. CUDA + nccl when available, else CPU + gloo; `--device cpu` forces CPU.
"""

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.training.arguments import parse_args, validate_args
from megatron.training.checkpointing import check_save_directory, load_args_from_checkpoint
from megatron.training.global_vars import get_args, set_global_variables
from megatron.training.utils import print_rank_0


def initialize_megatron(
    extra_args_provider=None,
    args_defaults=None,
    ignore_unknown_args=False,
    args_list=None,
    get_embedding_ranks=None,
    get_position_embedding_ranks=None,
):
    """Parse flags (`args_list`, else sys.argv), validate them, initialise torch.distributed and seed.

    `get_embedding_ranks` / `get_position_embedding_ranks` go to parallel_state.initialize_model_parallel.
    """
    args = parse_args(extra_args_provider, ignore_unknown_args, args_list)
    if args.use_checkpoint_args:
        load_args_from_checkpoint(args)
    validate_args(args, args_defaults)
    if args.save is not None:
        check_save_directory(args.save)
    set_global_variables(args)
    _initialize_distributed(args, get_embedding_ranks, get_position_embedding_ranks)
    set_random_seed(args.seed, args.data_parallel_random_init)
    return get_args()


def _initialize_distributed(args, get_embedding_ranks=None, get_position_embedding_ranks=None):
    """The default process group (single process: an in-memory store) and the model-parallel groups."""
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank or 0))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    timeout = timedelta(minutes=args.distributed_timeout_minutes)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(
                backend=args.distributed_backend, rank=args.rank, world_size=args.world_size, timeout=timeout
            )
        else:
            dist.init_process_group(
                backend=args.distributed_backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            context_parallel_size=args.context_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            nccl_communicator_config_path=args.nccl_communicator_config_path,
            distributed_timeout_minutes=args.distributed_timeout_minutes,
            order="tp-cp-ep-pp-dp" if args.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp",
            get_embedding_ranks=get_embedding_ranks,
            get_position_embedding_ranks=get_position_embedding_ranks,
        )
    print_rank_0(
        f"> initialized torch.distributed ({args.distributed_backend}) on {args.device}: world size "
        f"{args.world_size}, tensor-parallel {args.tensor_model_parallel_size}, pipeline-parallel "
        f"{args.pipeline_model_parallel_size}, data-parallel {args.data_parallel_size}"
    )


def set_random_seed(seed: int, data_parallel_random_init: bool = False) -> None:
    """Seed python, numpy, torch and the tensor-parallel streams.

    Pipeline stages get distinct seeds (they hold different layers); data-parallel replicas share one
    unless each should initialise its own weights.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    if data_parallel_random_init:
        seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
