"""Model-parallel process groups and rank queries, with Megatron-LM core_v0.9.0's names and rank layout.

Every rank has one coordinate per kind of parallelism (tp, cp, ep, dp, pp). `order` lists the kinds from the
fastest-varying to the slowest: with the default "tp-cp-ep-dp-pp",
global rank = tp + TP * (cp + CP * (dp + DP * pp)), so tensor-parallel groups hold neighbouring ranks (one node,
fast links) and pipeline groups stride across the whole world. Expert parallelism splits the data-parallel
coordinate (EP must divide DP and sit next to dp in `order`); `RankGenerator` computes every group.

Before `initialize_model_parallel` every size query answers 1 and every rank query 0, so single-process
code (tests, conversion tools, CPU generation) runs without any process group; asking for a group raises.
"""

import itertools
import os
import warnings
from datetime import timedelta
from functools import partial
from typing import Callable, Dict, List, Optional

import torch

from megatron.core.errors import UserError
from megatron.core.utils import GlobalMemoryBuffer


class ParallelLayoutError(UserError, RuntimeError, ValueError):
    """A parallel layout that cannot be formed from the launched processes."""


class GroupNotInitializedError(RuntimeError, AssertionError):
    """A process group was asked for before initialize_model_parallel (Megatron asserts here)."""


# This rank's groups and their global ranks, by name (see initialize_model_parallel for the names).
_GROUPS: Dict[str, object] = {}
_GLOBAL_RANKS: Dict[str, List[int]] = {}
# Values set by the set_* functions, which win over the groups (Megatron's _MPU_* overrides).
_OVERRIDES: Dict[str, int] = {}

_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK: Optional[int] = None
_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE: Optional[int] = None
_PIPELINE_MODEL_PARALLEL_SPLIT_RANK: Optional[int] = None
_GLOBAL_MEMORY_BUFFER: Optional[GlobalMemoryBuffer] = None
_MOE_LAYER_WISE_LOGGING_TRACKER: dict = {}


def generate_masked_orthogonal_rank_groups(
    world_size: int, parallel_size: List[int], mask: List[bool]
) -> List[List[int]]:
    """The groups spanned by the masked dimensions of a rank grid.

    `parallel_size` lists the grid's dimensions fastest-varying first (rank = sum(index_i * stride_i),
    stride_i = product of the sizes before i). A group holds the ranks that differ only in the masked
    dimensions; groups are listed, and ranks within a group, with the first such dimension varying fastest.
    """
    strides = [1]
    for size in parallel_size[:-1]:
        strides.append(strides[-1] * size)
    inner = [(size, stride) for size, stride, masked in zip(parallel_size, strides, mask) if masked]
    outer = [(size, stride) for size, stride, masked in zip(parallel_size, strides, mask) if not masked]

    def offsets(dimensions) -> List[int]:
        # itertools.product varies its last argument fastest, so feed the dimensions reversed.
        grid = itertools.product(*(range(size) for size, _ in reversed(dimensions)))
        return [sum(index * stride for index, (_, stride) in zip(point, reversed(dimensions))) for point in grid]

    groups = [[base + offset for offset in offsets(inner)] for base in offsets(outer)]
    if sum(len(group) for group in groups) != world_size:
        raise ParallelLayoutError(f"the layout {parallel_size} does not cover {world_size} ranks")
    return groups


class RankGenerator:
    """The rank groups of one tp x cp x ep x dp x pp layout in a given `order` (Megatron-LM's layout).

    Kinds missing from `order` are appended (they must have size 1). `ep` lives inside `dp`: without
    `independent_ep` a token's groups treat dp as one dimension; with it, dp is split into (dp / ep, ep).
    """

    def __init__(self, tp: int, ep: int, dp: int, pp: int, cp: int, order: str, rank_offset: int = 0) -> None:
        self.tp, self.ep, self.dp, self.pp, self.cp = tp, ep, dp, pp, cp
        self.rank_offset = rank_offset
        self.world_size = tp * dp * pp * cp
        self.name_to_size = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "cp": cp}
        self.order = order
        tokens = order.lower().split("-")
        if "ep" in tokens and abs(tokens.index("ep") - tokens.index("dp")) != 1:
            raise RuntimeError(f"The ep and dp must be adjacent in order ({order}).")
        for name, size in self.name_to_size.items():
            if name not in tokens:
                if size != 1:
                    raise RuntimeError(f"the size of {name} is {size}, but the order ({order}) does not name it")
                tokens.append(name)
        if dp % ep:
            raise ParallelLayoutError(f"data-parallel size {dp} is not divisible by expert-parallel size {ep}")
        self.order_w_ep = "-".join(tokens)
        self.order_wo_ep = "-".join(token for token in tokens if token != "ep")
        self.ordered_size_w_ep = [dp // ep if token == "dp" else self.name_to_size[token] for token in tokens]
        self.ordered_size_wo_ep = [self.name_to_size[token] for token in tokens if token != "ep"]

    def get_mask(self, order: str, token: str) -> List[bool]:
        """Which dimensions of `order` the hyphenated `token` (e.g. "tp-dp") names."""
        wanted = token.split("-")
        return [name in wanted for name in order.split("-")]

    def get_ranks(self, token: str, independent_ep: bool = False) -> List[List[int]]:
        """Every group of the kinds in `token`; `independent_ep`: dp means data-modulo-expert-parallel."""
        order, sizes = (
            (self.order_w_ep, self.ordered_size_w_ep) if independent_ep else (self.order_wo_ep, self.ordered_size_wo_ep)
        )
        groups = generate_masked_orthogonal_rank_groups(self.world_size, sizes, self.get_mask(order, token))
        return [[rank + self.rank_offset for rank in group] for group in groups]


def default_embedding_ranks(pp_ranks: List[int], split_rank: Optional[int] = None) -> List[int]:
    """The stages holding a copy of the word embeddings: the first (input) and the last (output head)."""
    if len(pp_ranks) == 1:
        return [pp_ranks[0]]
    if split_rank is not None and pp_ranks[split_rank] not in (pp_ranks[0], pp_ranks[-1]):
        return [pp_ranks[0], pp_ranks[split_rank], pp_ranks[-1]]
    return [pp_ranks[0], pp_ranks[-1]]


def default_position_embedding_ranks(pp_ranks: List[int], split_rank: Optional[int] = None) -> List[int]:
    """The stages holding the learned position embeddings: the first."""
    if split_rank is not None and pp_ranks[0] != pp_ranks[split_rank]:
        return [pp_ranks[0], pp_ranks[split_rank]]
    return [pp_ranks[0]]


def get_nccl_options(pg_name: str, nccl_comm_cfgs: dict):
    """NCCL options for the group `pg_name` from --nccl-communicator-config-path's yaml, or None."""
    if pg_name not in nccl_comm_cfgs:
        return None
    options = torch.distributed.ProcessGroupNCCL.Options()
    config = nccl_comm_cfgs[pg_name]
    options.config.cga_cluster_size = config.get("cga_cluster_size", 4)
    options.config.max_ctas = config.get("max_ctas", 32)
    options.config.min_ctas = config.get("min_ctas", 1)
    return options


def _read_nccl_configs(path: Optional[str]) -> dict:
    if path is None:
        return {}
    try:
        import yaml
    except ImportError as error:
        raise RuntimeError("nccl_communicator_config_path needs the yaml package: pip install pyyaml") from error
    with open(path) as stream:
        return yaml.safe_load(stream) or {}


class _GroupFactory:
    """Creates process groups, once per distinct (ranks, backend, options): torch.distributed.new_group is
    collective, and every rank computes the same lists in the same order, so skipping a repeat is safe."""

    def __init__(self, timeout: timedelta, nccl_comm_cfgs: dict):
        self.timeout = timeout
        self.nccl_comm_cfgs = nccl_comm_cfgs if torch.distributed.get_backend() == "nccl" else {}
        self.default_is_gloo = torch.distributed.get_backend() == "gloo"
        self.created = {}

    def __call__(self, ranks: List[int], pg_name: str, gloo: bool = False):
        if gloo and self.default_is_gloo:
            gloo = False
        options_name = pg_name if not gloo and pg_name in self.nccl_comm_cfgs else None
        key = (tuple(ranks), gloo, options_name)
        if key not in self.created:
            kwargs = {"backend": "gloo"} if gloo else {"pg_options": get_nccl_options(pg_name, self.nccl_comm_cfgs)}
            self.created[key] = torch.distributed.new_group(ranks, timeout=self.timeout, **kwargs)
        return self.created[key]


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    pipeline_model_parallel_split_rank: Optional[int] = None,
    use_sharp: bool = False,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    nccl_communicator_config_path: Optional[str] = None,
    distributed_timeout_minutes: int = 30,
    order: str = "tp-cp-ep-dp-pp",
    encoder_tensor_model_parallel_size: Optional[int] = 0,
    encoder_pipeline_model_parallel_size: Optional[int] = 0,
    get_embedding_ranks: Optional[Callable[[List[int], Optional[int]], List[int]]] = None,
    get_position_embedding_ranks: Optional[Callable[[List[int], Optional[int]], List[int]]] = None,
    expert_tensor_parallel_size: Optional[int] = None,
) -> None:
    """Create every model-parallel group of this layout over the default process group.

    Every rank must call this with the same arguments; torch.distributed must already be initialised.
    Data parallelism takes the ranks left over: DP = world / (TP * CP * PP). MoE layers fold their own layout
    over the same ranks (Megatron's expert folding): expert tensor parallel ETP (default TP) x expert parallel EP
    x expert data parallel world / (ETP * EP * PP) x the same pipeline stages, without context parallelism.
    Encoder-decoder layouts (`encoder_*` > 0) are not supported.
    """
    if not torch.distributed.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed.init_process_group() to have run first")
    if encoder_tensor_model_parallel_size or encoder_pipeline_model_parallel_size:
        raise ParallelLayoutError(
            "encoder-decoder layouts (encoder_tensor/pipeline_model_parallel_size > 0) are not supported; leave them 0"
        )
    if model_parallel_is_initialized():
        raise RuntimeError("model-parallel groups are already initialised; call destroy_model_parallel() first")
    world_size = torch.distributed.get_world_size()
    sizes = (tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size, expert_model_parallel_size)
    model_size = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if min(sizes) < 1 or world_size % model_size:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by tensor-parallel size {tensor_model_parallel_size} x "
            f"pipeline-parallel size {pipeline_model_parallel_size} x context-parallel size {context_parallel_size}; "
            f"launch a multiple of {model_size} processes"
        )
    data_parallel_size = world_size // model_size
    expert_tensor_parallel_size = expert_tensor_parallel_size or tensor_model_parallel_size
    expert_model_size = expert_tensor_parallel_size * expert_model_parallel_size * pipeline_model_parallel_size
    if expert_tensor_parallel_size < 1 or world_size % expert_model_size:
        raise ParallelLayoutError(
            f"world size {world_size} is not divisible by expert-tensor-parallel size {expert_tensor_parallel_size} "
            f"x expert-parallel size {expert_model_parallel_size} x pipeline-parallel size "
            f"{pipeline_model_parallel_size}; change --expert-model-parallel-size, --expert-tensor-parallel-size or "
            f"the number of processes"
        )
    if virtual_pipeline_model_parallel_size is not None and pipeline_model_parallel_size < 2:
        raise ParallelLayoutError("a virtual pipeline (interleaved schedule) needs pipeline-model-parallel size > 1")

    generator = RankGenerator(
        tp=tensor_model_parallel_size,
        ep=1,
        dp=data_parallel_size,
        pp=pipeline_model_parallel_size,
        cp=context_parallel_size,
        order=order,
    )
    expert_generator = RankGenerator(
        tp=expert_tensor_parallel_size,
        ep=expert_model_parallel_size,
        dp=world_size // (expert_tensor_parallel_size * pipeline_model_parallel_size),
        pp=pipeline_model_parallel_size,
        cp=1,
        order=order,
    )
    if expert_generator.get_ranks("pp") != generator.get_ranks("pp"):
        raise ParallelLayoutError(
            f"the order {order} gives MoE layers other pipeline stages than the dense layers; keep pp last"
        )
    new_group = _GroupFactory(
        timedelta(minutes=distributed_timeout_minutes), _read_nccl_configs(nccl_communicator_config_path)
    )
    rank = torch.distributed.get_rank()

    def build(name: str, token: str, pg_name: str, independent_ep: bool = False, gloo: bool = False):
        # Expert groups (independent_ep) come from the expert layout.
        layout = expert_generator if independent_ep else generator
        for ranks in layout.get_ranks(token, independent_ep=independent_ep):
            group = new_group(ranks, pg_name)
            gloo_group = new_group(ranks, pg_name, gloo=True) if gloo else None
            if rank in ranks:
                _GROUPS[name], _GLOBAL_RANKS[name] = group, ranks
                if gloo:
                    _GROUPS[name + "-gloo"] = gloo_group

    # Names: Megatron's tokens; "-modulo-ep" marks data parallelism within one expert-parallel rank.
    build("dp", "dp", "dp", gloo=True)
    build("dp-cp", "dp-cp", "dp_cp", gloo=True)
    build("cp", "cp", "cp")
    build("mp", "tp-pp", "mp")
    build("mp-ep", "tp-ep-pp", "mp_exp", independent_ep=True)
    build("tp", "tp", "tp")
    build("tp-dp-cp", "tp-dp-cp", "tp_dp_cp")
    build("tp-dp", "tp-dp", "tp_dp")
    build("tp-cp", "tp-cp", "tp_cp")
    build("tp-ep", "tp-ep", "tp_exp", independent_ep=True)
    build("ep", "ep", "exp", independent_ep=True)
    build("etp", "tp", "tp_exp_only", independent_ep=True)
    build("dp-modulo-ep", "dp", "dp_modulo_exp", independent_ep=True, gloo=True)
    # The expert layout has no context-parallel dimension: its data parallelism already spans those ranks.
    build("dp-modulo-ep-cp", "dp", "dp_modulo_exp_cp", independent_ep=True, gloo=True)

    get_embedding_ranks = get_embedding_ranks or partial(
        default_embedding_ranks, split_rank=pipeline_model_parallel_split_rank
    )
    get_position_embedding_ranks = get_position_embedding_ranks or partial(
        default_position_embedding_ranks, split_rank=pipeline_model_parallel_split_rank
    )
    for ranks in generator.get_ranks("pp"):
        group = new_group(ranks, "pp")
        if rank in ranks:
            _GROUPS["pp"], _GLOBAL_RANKS["pp"] = group, ranks
        for name, ranks_of in (("embd", get_embedding_ranks), ("pos-embd", get_position_embedding_ranks)):
            member_ranks = ranks_of(ranks)
            group = new_group(member_ranks, "embd")
            if rank in ranks:
                # Every stage knows its pipeline's embedding ranks; only members hold the group.
                _GLOBAL_RANKS[name] = member_ranks
                _GROUPS[name] = group if rank in member_ranks else None

    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _PIPELINE_MODEL_PARALLEL_SPLIT_RANK, _GLOBAL_MEMORY_BUFFER
    if virtual_pipeline_model_parallel_size is not None:
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = 0
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = virtual_pipeline_model_parallel_size
    _PIPELINE_MODEL_PARALLEL_SPLIT_RANK = pipeline_model_parallel_split_rank
    _GLOBAL_MEMORY_BUFFER = GlobalMemoryBuffer()
    if use_sharp:
        # SHARP applies to the data-parallel groups only: form them now, keep other groups off CollNet.
        torch.distributed.barrier(group=get_data_parallel_group(with_context_parallel=True))
        os.environ["NCCL_COLLNET_ENABLE"] = "0"


def destroy_model_parallel() -> None:
    """Forget every group (the default process group stays): tests and tools can re-initialise."""
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _PIPELINE_MODEL_PARALLEL_SPLIT_RANK, _GLOBAL_MEMORY_BUFFER, _MOE_LAYER_WISE_LOGGING_TRACKER
    _GROUPS.clear()
    _GLOBAL_RANKS.clear()
    _OVERRIDES.clear()
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
    _PIPELINE_MODEL_PARALLEL_SPLIT_RANK = None
    _GLOBAL_MEMORY_BUFFER = None
    _MOE_LAYER_WISE_LOGGING_TRACKER = {}


def is_initialized() -> bool:
    """True once the data-parallel group exists (code that runs with or without model parallelism)."""
    return "dp" in _GROUPS


def is_unitialized() -> bool:
    """Deprecated (Megatron's spelling): not is_initialized()."""
    warnings.warn("is_unitialized is deprecated, use is_initialized instead", DeprecationWarning)
    return not is_initialized()


def model_parallel_is_initialized() -> bool:
    """True once initialize_model_parallel has formed this rank's groups."""
    return all(name in _GROUPS for name in ("tp", "pp", "dp"))


def _group(name: str, description: str, check_initialized: bool = True):
    if check_initialized and name not in _GROUPS:
        raise GroupNotInitializedError(
            f"the {description} group is not initialised; call parallel_state.initialize_model_parallel()"
        )
    return _GROUPS.get(name)


def get_model_parallel_group(with_expert_parallel: bool = False, check_initialized: bool = True):
    """Tensor x pipeline ranks (with_expert_parallel: tensor x expert x pipeline)."""
    if with_expert_parallel:
        return _group("mp-ep", "model-and-expert-parallel", check_initialized)
    return _group("mp", "model-parallel", check_initialized)


def get_tensor_model_parallel_group(check_initialized: bool = True):
    return _group("tp", "tensor-model-parallel", check_initialized)


def get_pipeline_model_parallel_group(check_initialized: bool = True):
    return _group("pp", "pipeline-model-parallel", check_initialized)


def get_data_parallel_group(with_context_parallel: bool = False, check_initialized: bool = True):
    """Ranks holding the same weights (with_context_parallel: also those splitting the same sequences)."""
    if with_context_parallel:
        return _group("dp-cp", "data-parallel (with context parallel)", check_initialized)
    return _group("dp", "data-parallel", check_initialized)


def get_data_parallel_group_gloo(with_context_parallel: bool = False):
    """The data-parallel group on gloo (CPU-side collectives such as checkpoint metadata)."""
    return _group("dp-cp-gloo" if with_context_parallel else "dp-gloo", "gloo data-parallel")


def get_context_parallel_group(check_initialized: bool = True):
    return _group("cp", "context-parallel", check_initialized)


def get_context_parallel_global_ranks(check_initialized: bool = True) -> Optional[List[int]]:
    if check_initialized and "cp" not in _GLOBAL_RANKS:
        _group("cp", "context-parallel")
    return _GLOBAL_RANKS.get("cp")


def get_embedding_group(check_initialized: bool = True):
    """The first and last pipeline stages, which hold the tied word embeddings (None elsewhere)."""
    if check_initialized and "embd" not in _GLOBAL_RANKS:
        _group("embd", "embedding")
    return _GROUPS.get("embd")


def get_position_embedding_group(check_initialized: bool = True):
    """The first pipeline stage, which holds the learned position embeddings (None elsewhere)."""
    if check_initialized and "pos-embd" not in _GLOBAL_RANKS:
        _group("pos-embd", "position-embedding")
    return _GROUPS.get("pos-embd")


def get_amax_reduction_group(with_context_parallel: bool = False, tp_only_amax_red: bool = False):
    """The group that reduces FP8 amax statistics."""
    if tp_only_amax_red:
        return get_tensor_and_context_parallel_group() if with_context_parallel else get_tensor_model_parallel_group()
    return get_tensor_and_data_parallel_group(with_context_parallel)


def get_tensor_and_data_parallel_group(with_context_parallel: bool = False):
    if with_context_parallel:
        return _group("tp-dp-cp", "tensor-and-data-parallel (with context parallel)")
    return _group("tp-dp", "tensor-and-data-parallel")


def get_tensor_and_context_parallel_group():
    return _group("tp-cp", "tensor-and-context-parallel")


def get_expert_model_parallel_group():
    return _group("ep", "expert-model-parallel")


def get_tensor_and_expert_parallel_group():
    """core_v0.9.0's name of get_expert_tensor_and_model_parallel_group."""
    return get_expert_tensor_and_model_parallel_group()


def get_expert_tensor_parallel_group(check_initialized: bool = True):
    """Ranks splitting each expert's weights (--expert-tensor-parallel-size)."""
    return _group("etp", "expert-tensor-parallel", check_initialized)


def get_expert_tensor_and_model_parallel_group(check_initialized: bool = True):
    """Expert tensor x expert parallel ranks: where the all-gather dispatcher gathers tokens."""
    return _group("tp-ep", "expert-tensor-and-model-parallel", check_initialized)


def get_expert_tensor_model_pipeline_parallel_group(check_initialized: bool = True):
    """Expert tensor x expert x pipeline parallel ranks: where routed experts' gradient statistics sum."""
    return _group("mp-ep", "expert-tensor-model-pipeline-parallel", check_initialized)


def get_expert_data_parallel_group(check_initialized: bool = True):
    """Ranks holding the same expert shards: their gradients are summed over it."""
    return _group("dp-modulo-ep", "expert-data-parallel", check_initialized)


def get_data_modulo_expert_parallel_group(with_context_parallel: bool = False):
    """Ranks holding the same experts: data parallelism within one expert-parallel rank (the expert layout
    spans the context-parallel ranks, so both variants are the expert-data-parallel group)."""
    if with_context_parallel:
        return _group("dp-modulo-ep-cp", "data-modulo-expert-parallel (with context parallel)")
    return _group("dp-modulo-ep", "data-modulo-expert-parallel")


def get_data_modulo_expert_parallel_group_gloo(with_context_parallel: bool = False):
    name = "dp-modulo-ep-cp-gloo" if with_context_parallel else "dp-modulo-ep-gloo"
    return _group(name, "gloo data-modulo-expert-parallel")


def set_tensor_model_parallel_world_size(world_size: Optional[int]) -> None:
    """Override the tensor-parallel size the queries answer (tools that emulate a rank without groups)."""
    _set_override("tp_size", world_size)


def set_pipeline_model_parallel_world_size(world_size: Optional[int]) -> None:
    _set_override("pp_size", world_size)


def set_expert_model_parallel_world_size(world_size: Optional[int]) -> None:
    _set_override("ep_size", world_size)


def set_tensor_model_parallel_rank(rank: Optional[int]) -> None:
    _set_override("tp_rank", rank)


def set_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    _set_override("pp_rank", rank)


def set_expert_model_parallel_rank(rank: Optional[int]) -> None:
    _set_override("ep_rank", rank)


def set_data_parallel_rank(rank: Optional[int]) -> None:
    _set_override("dp_rank", rank)


def _set_override(key: str, value: Optional[int]) -> None:
    if value is None:
        _OVERRIDES.pop(key, None)
    else:
        _OVERRIDES[key] = value


def _size(name: str) -> int:
    group = _GROUPS.get(name)
    return 1 if group is None else torch.distributed.get_world_size(group=group)


def _rank(name: str) -> int:
    group = _GROUPS.get(name)
    return 0 if group is None else torch.distributed.get_rank(group=group)


def get_tensor_model_parallel_world_size() -> int:
    return _OVERRIDES.get("tp_size") or _size("tp")


def get_tensor_model_parallel_rank() -> int:
    return _OVERRIDES.get("tp_rank", _rank("tp"))


def get_pipeline_model_parallel_world_size() -> int:
    return _OVERRIDES.get("pp_size") or _size("pp")


def get_pipeline_model_parallel_rank() -> int:
    return _OVERRIDES.get("pp_rank", _rank("pp"))


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    return _size("dp-cp" if with_context_parallel else "dp")


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    return _OVERRIDES.get("dp_rank", _rank("dp-cp" if with_context_parallel else "dp"))


def get_context_parallel_world_size() -> int:
    return _size("cp")


def get_context_parallel_rank() -> int:
    return _rank("cp")


def get_tensor_and_context_parallel_world_size() -> int:
    return _size("tp-cp")


def get_tensor_and_context_parallel_rank() -> int:
    return _rank("tp-cp")


def get_expert_model_parallel_world_size() -> int:
    return _OVERRIDES.get("ep_size") or _size("ep")


def get_expert_model_parallel_rank() -> int:
    return _OVERRIDES.get("ep_rank", _rank("ep"))


def get_tensor_and_expert_parallel_world_size() -> int:
    return _size("tp-ep")


def get_tensor_and_expert_parallel_rank() -> int:
    return _rank("tp-ep")


def get_expert_tensor_parallel_world_size() -> int:
    return _size("etp")


def get_expert_tensor_parallel_rank() -> int:
    return _rank("etp")


def get_expert_data_parallel_world_size() -> int:
    return _size("dp-modulo-ep")


def get_expert_data_parallel_rank() -> int:
    return _rank("dp-modulo-ep")


get_expert_tensor_and_model_parallel_world_size = get_tensor_and_expert_parallel_world_size
get_expert_tensor_and_model_parallel_rank = get_tensor_and_expert_parallel_rank


def get_data_modulo_expert_parallel_rank(with_context_parallel: bool = False) -> int:
    return _rank("dp-modulo-ep-cp" if with_context_parallel else "dp-modulo-ep")


def _own_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor-parallel rank 0 in this rank's group (the one that broadcasts batches)."""
    return _GLOBAL_RANKS["tp"][0] if "tp" in _GLOBAL_RANKS else _own_rank()


def get_data_parallel_src_rank(with_context_parallel: bool = False) -> int:
    name = "dp-cp" if with_context_parallel else "dp"
    return _GLOBAL_RANKS[name][0] if name in _GLOBAL_RANKS else _own_rank()


def _pipeline_global_ranks() -> List[int]:
    return _GLOBAL_RANKS.get("pp") or [_own_rank()]


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


def get_pipeline_model_parallel_split_rank() -> Optional[int]:
    """Deprecated in Megatron (encoder-decoder models): the first decoder stage, or None."""
    return _PIPELINE_MODEL_PARALLEL_SPLIT_RANK


def set_pipeline_model_parallel_split_rank(rank: Optional[int]) -> None:
    global _PIPELINE_MODEL_PARALLEL_SPLIT_RANK
    _PIPELINE_MODEL_PARALLEL_SPLIT_RANK = rank


def is_pipeline_stage_before_split(rank: Optional[int] = None) -> bool:
    """True on encoder stages of an encoder-decoder pipeline (every stage of a decoder-only model)."""
    if get_pipeline_model_parallel_world_size() == 1 or _PIPELINE_MODEL_PARALLEL_SPLIT_RANK is None:
        return True
    rank = get_pipeline_model_parallel_rank() if rank is None else rank
    return rank < _PIPELINE_MODEL_PARALLEL_SPLIT_RANK


def is_pipeline_stage_after_split(rank: Optional[int] = None) -> bool:
    """True on decoder stages (every stage of a decoder-only model)."""
    if get_pipeline_model_parallel_world_size() == 1 or _PIPELINE_MODEL_PARALLEL_SPLIT_RANK is None:
        return True
    rank = get_pipeline_model_parallel_rank() if rank is None else rank
    return rank >= _PIPELINE_MODEL_PARALLEL_SPLIT_RANK


def is_pipeline_stage_at_split() -> bool:
    """True on the last encoder stage (the next stage starts the decoder)."""
    rank = get_pipeline_model_parallel_rank()
    return is_pipeline_stage_before_split(rank) and is_pipeline_stage_after_split(rank + 1)


def is_inside_encoder(rank: Optional[int] = None) -> bool:
    """Encoder-decoder pipelines are not supported, so every stage counts as both encoder and decoder."""
    return True


def is_inside_decoder(rank: Optional[int] = None) -> bool:
    return True


def get_virtual_pipeline_model_parallel_world_size() -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE


def set_virtual_pipeline_model_parallel_world_size(world_size: Optional[int]) -> None:
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = world_size


def get_virtual_pipeline_model_parallel_rank() -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK


def set_virtual_pipeline_model_parallel_rank(rank: Optional[int]) -> None:
    """The interleaved schedule sets the model chunk it is about to run."""
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = rank


def _virtual_stage(vp_stage: Optional[int]) -> Optional[int]:
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK if vp_stage is None else vp_stage


def is_pipeline_first_stage(ignore_virtual: bool = False, vp_stage: Optional[int] = None) -> bool:
    """True on the stage that embeds the tokens (unless `ignore_virtual`: and only for the first chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _virtual_stage(vp_stage) != 0:
            return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual: bool = False, vp_stage: Optional[int] = None) -> bool:
    """True on the stage that computes logits and loss (unless `ignore_virtual`: only for the last chunk)."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None:
        if _virtual_stage(vp_stage) != _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE - 1:
            return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def is_rank_in_embedding_group(ignore_virtual: bool = False, vp_stage: Optional[int] = None) -> bool:
    """True where this rank holds a copy of the word embeddings that must stay in sync."""
    embedding_ranks = _GLOBAL_RANKS.get("embd")
    if embedding_ranks is None:
        return True
    rank = torch.distributed.get_rank()
    if rank not in embedding_ranks:
        return False
    if ignore_virtual:
        return True
    if rank == embedding_ranks[0]:
        return is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if rank == embedding_ranks[-1]:
        return is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return True


def is_rank_in_position_embedding_group() -> bool:
    position_embedding_ranks = _GLOBAL_RANKS.get("pos-embd")
    return position_embedding_ranks is None or torch.distributed.get_rank() in position_embedding_ranks


def get_global_memory_buffer() -> GlobalMemoryBuffer:
    if _GLOBAL_MEMORY_BUFFER is None:
        raise GroupNotInitializedError("the global memory buffer is created by initialize_model_parallel()")
    return _GLOBAL_MEMORY_BUFFER


def destroy_global_memory_buffer() -> None:
    global _GLOBAL_MEMORY_BUFFER
    _GLOBAL_MEMORY_BUFFER = None


def get_all_ranks() -> str:
    """This rank's tp_dp_cp_pp_ep coordinates as one string (used in file names)."""
    ranks = [
        get_tensor_model_parallel_rank(),
        get_data_parallel_rank(),
        get_context_parallel_rank(),
        get_pipeline_model_parallel_rank(),
        get_expert_model_parallel_rank(),
    ]
    return "_".join(str(rank or 0) for rank in ranks)


def get_moe_layer_wise_logging_tracker() -> dict:
    return _MOE_LAYER_WISE_LOGGING_TRACKER
