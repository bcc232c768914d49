"""Model-parallel process groups and rank queries.

Ranks are laid out as in Megatron-LM: tensor-parallel ranks vary fastest, then data-parallel, then
pipeline-parallel, so global rank = tp_rank + TP * (dp_rank + DP * pp_rank). Tensor-parallel groups hold
neighbouring ranks (one node, fast links), pipeline groups stride across the whole world.

Before `initialize_model_parallel` every size query answers 1 and every rank query 0, so single-process
code (tests, conversion tools, CPU generation) runs without any process group.
"""

from datetime import timedelta
from typing import List, Optional

import torch
from megatron.core.errors import UserError

_TENSOR_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None
_MODEL_PARALLEL_GROUP = None
_EMBEDDING_GROUP = None

_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS: Optional[List[int]] = None
_PIPELINE_GLOBAL_RANKS: Optional[List[int]] = None
_DATA_PARALLEL_GLOBAL_RANKS: Optional[List[int]] = None
_EMBEDDING_GLOBAL_RANKS: Optional[List[int]] = None

_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK: Optional[int] = None
_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE: Optional[int] = None


class ParallelLayoutError(UserError, ValueError):
    """A tensor/pipeline/data layout that cannot be formed from the launched processes."""


def _rank_groups(world_size: int, tensor_size: int, pipeline_size: int):
    """Global ranks of every tensor, data, pipeline and model-parallel group, in Megatron-LM's order."""
    data_size = world_size // (tensor_size * pipeline_size)

    def rank_of(tp: int, dp: int, pp: int) -> int:
        return tp + tensor_size * (dp + data_size * pp)

    tensor_groups = [
        [rank_of(tp, dp, pp) for tp in range(tensor_size)] for pp in range(pipeline_size) for dp in range(data_size)
    ]
    data_groups = [
        [rank_of(tp, dp, pp) for dp in range(data_size)] for pp in range(pipeline_size) for tp in range(tensor_size)
    ]
    pipeline_groups = [
        [rank_of(tp, dp, pp) for pp in range(pipeline_size)] for dp in range(data_size) for tp in range(tensor_size)
    ]
    model_groups = [
        sorted(rank_of(tp, dp, pp) for pp in range(pipeline_size) for tp in range(tensor_size))
        for dp in range(data_size)
    ]
    return tensor_groups, data_groups, pipeline_groups, model_groups


def embedding_ranks(pipeline_ranks: List[int]) -> List[int]:
    """The stages holding a copy of the word embeddings: the first (input) and the last (output head)."""
    if len(pipeline_ranks) > 1:
        return [pipeline_ranks[0], pipeline_ranks[-1]]
    return list(pipeline_ranks)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    distributed_timeout_minutes: int = 30,
) -> None:
    """Create the tensor, pipeline, data, model-parallel and embedding groups over the default group.

    Every rank must call this with the same sizes; torch.distributed must already be initialised.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "initialize_model_parallel needs torch.distributed.init_process_group() to have run first"
        )
    world_size = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    model_size = tensor_model_parallel_size * pipeline_model_parallel_size
    if tensor_model_parallel_size < 1 or pipeline_model_parallel_size < 1 or world_size % model_size:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by tensor-parallel size {tensor_model_parallel_size} x "
            f"pipeline-parallel size {pipeline_model_parallel_size}; launch a multiple of {model_size} processes"
        )
    if model_parallel_is_initialized():
        raise RuntimeError("model-parallel groups are already initialised; call destroy_model_parallel() first")

    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP
    global _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS, _DATA_PARALLEL_GLOBAL_RANKS
    global _EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE

    timeout = timedelta(minutes=distributed_timeout_minutes)
    tensor_groups, data_groups, pipeline_groups, model_groups = _rank_groups(
        world_size, tensor_model_parallel_size, pipeline_model_parallel_size
    )

    # new_group is collective over the whole world: every rank creates every group, keeps its own.
    for ranks in tensor_groups:
        group = torch.distributed.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = group, ranks
    for ranks in data_groups:
        group = torch.distributed.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _DATA_PARALLEL_GROUP, _DATA_PARALLEL_GLOBAL_RANKS = group, ranks
    for ranks in model_groups:
        group = torch.distributed.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _MODEL_PARALLEL_GROUP = group
    for ranks in pipeline_groups:
        group = torch.distributed.new_group(ranks, timeout=timeout)
        if rank in ranks:
            _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS = group, ranks
        shared_embedding = embedding_ranks(ranks)
        group = torch.distributed.new_group(shared_embedding, timeout=timeout)
        if rank in ranks:
            _EMBEDDING_GLOBAL_RANKS = shared_embedding
            _EMBEDDING_GROUP = group if rank in shared_embedding else None

    if virtual_pipeline_model_parallel_size is not None:
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = 0
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = virtual_pipeline_model_parallel_size


def destroy_model_parallel() -> None:
    """Forget every group (the default process group stays): tests and tools can re-initialise."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP
    global _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS, _DATA_PARALLEL_GLOBAL_RANKS
    global _EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    _TENSOR_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = None
    _MODEL_PARALLEL_GROUP = _EMBEDDING_GROUP = None
    _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = _PIPELINE_GLOBAL_RANKS = _DATA_PARALLEL_GLOBAL_RANKS = None
    _EMBEDDING_GLOBAL_RANKS = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None


def model_parallel_is_initialized() -> bool:
    """True once initialize_model_parallel has formed this rank's groups."""
    return _TENSOR_MODEL_PARALLEL_GROUP is not None and _DATA_PARALLEL_GROUP is not None


def _require_group(group, name: str, check_initialized: bool = True):
    if check_initialized and group is None:
        raise RuntimeError(f"the {name} group is not initialised; call parallel_state.initialize_model_parallel()")
    return group


def get_tensor_model_parallel_group(check_initialized: bool = True):
    return _require_group(_TENSOR_MODEL_PARALLEL_GROUP, "tensor-model-parallel", check_initialized)


def get_pipeline_model_parallel_group(check_initialized: bool = True):
    return _require_group(_PIPELINE_MODEL_PARALLEL_GROUP, "pipeline-model-parallel", check_initialized)


def get_data_parallel_group(check_initialized: bool = True):
    return _require_group(_DATA_PARALLEL_GROUP, "data-parallel", check_initialized)


def get_model_parallel_group(check_initialized: bool = True):
    return _require_group(_MODEL_PARALLEL_GROUP, "model-parallel", check_initialized)


def get_embedding_group(check_initialized: bool = True):
    """The first and last pipeline stages, which hold the tied word embeddings (None elsewhere)."""
    if check_initialized and _EMBEDDING_GLOBAL_RANKS is None:
        _require_group(None, "embedding")
    return _EMBEDDING_GROUP


def _group_size(group) -> int:
    return 1 if group is None else torch.distributed.get_world_size(group=group)


def _group_rank(group) -> int:
    return 0 if group is None else torch.distributed.get_rank(group=group)


def get_tensor_model_parallel_world_size() -> int:
    return _group_size(_TENSOR_MODEL_PARALLEL_GROUP)


def get_tensor_model_parallel_rank() -> int:
    return _group_rank(_TENSOR_MODEL_PARALLEL_GROUP)


def get_pipeline_model_parallel_world_size() -> int:
    return _group_size(_PIPELINE_MODEL_PARALLEL_GROUP)


def get_pipeline_model_parallel_rank() -> int:
    return _group_rank(_PIPELINE_MODEL_PARALLEL_GROUP)


def get_data_parallel_world_size() -> int:
    return _group_size(_DATA_PARALLEL_GROUP)


def get_data_parallel_rank() -> int:
    return _group_rank(_DATA_PARALLEL_GROUP)


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor-parallel rank 0 in this rank's group (the one that broadcasts batches)."""
    if _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS is None:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS[0]


def get_data_parallel_src_rank() -> int:
    if _DATA_PARALLEL_GLOBAL_RANKS is None:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return _DATA_PARALLEL_GLOBAL_RANKS[0]


def _pipeline_global_ranks() -> List[int]:
    if _PIPELINE_GLOBAL_RANKS is None:
        return [torch.distributed.get_rank() if torch.distributed.is_initialized() else 0]
    return _PIPELINE_GLOBAL_RANKS


def get_pipeline_model_parallel_first_rank() -> int:
    return _pipeline_global_ranks()[0]


def get_pipeline_model_parallel_last_rank() -> int:
    return _pipeline_global_ranks()[-1]


def get_pipeline_model_parallel_next_rank() -> int:
    """Global rank of the next stage (wrapping around, as the interleaved schedule expects)."""
    ranks = _pipeline_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = _pipeline_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK


def set_virtual_pipeline_model_parallel_rank(rank: int) -> None:
    """The interleaved schedule sets the model chunk it is about to run."""
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = rank


def _virtual_stage(vp_stage: Optional[int]) -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK if vp_stage is None else vp_stage


def is_pipeline_first_stage(ignore_virtual: bool = True, vp_stage: Optional[int] = None) -> bool:
    """True on the stage that embeds the tokens (with virtual stages: and only for the first chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _virtual_stage(vp_stage) != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = True, vp_stage: Optional[int] = None) -> bool:
    """True on the stage that computes logits and loss (with virtual stages: only for the last chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _virtual_stage(vp_stage) != _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE - 1:
            return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def is_rank_in_embedding_group(ignore_virtual: bool = True, vp_stage: Optional[int] = None) -> bool:
    """True where this rank holds a copy of the word embeddings that must stay in sync."""
    if _EMBEDDING_GLOBAL_RANKS is None:
        return True
    rank = torch.distributed.get_rank()
    if rank not in _EMBEDDING_GLOBAL_RANKS:
        return False
    if ignore_virtual:
        return True
    if rank == _EMBEDDING_GLOBAL_RANKS[0]:
        return is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    return is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
