"""--ckpt-format torch_dist: Megatron's distributed checkpoints for the training loop (either stack).

SAVE/iter_NNNNNNN/ holds global tensors under Megatron-core's keys (megatron/core/dist_checkpointing), so a run
resumes at any TP / PP / EP / DP / virtual-pipeline layout, and Megatron-LM reads what we write (and we read
what it writes). The legacy stack's tensors are stored under the mcore names, so either stack loads either.
Besides the model, the checkpoint holds:
- optimizer state as ShardedTensors shaped like their parameters, `optimizer.state.{param|exp_avg|exp_avg_sq}.{key}`
  (Megatron's fully reshardable form), so it reshards with the model; its hyperparameters in the common state;
- `rng_state` objects per (pipeline, tensor[, expert]) rank, restored when the layout is unchanged;
- the common state (common.pt): args (with the consumed samples), iteration, scheduler, FLOPs so far.
Every rank writes its share of the blocks; metadata.json and then the tracker are written once all are
complete, so an interrupted save (even a SIGKILL during --async-save) never becomes "latest".
"""

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.gpt_layout import (
    GPTCheckpointLayout,
    checkpoint_tensors,
    sharded_model_state,
    stacks_layers,
)
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel.state_dict_sharding import split_rule
from megatron.core.transformer.pipeline_layout import layer_offset_and_count
from megatron.legacy.model.checkpoint_names import legacy_to_mcore_names
from megatron.training.utils import print_rank_0, unwrap_model

OPTIMIZER_STATE_PREFIX = "optimizer.state."
_checkpoint_save_group = None  # (the world it was made in, the group)


# ------------------------------------------------------------------------------------------------ mapping


def _chunk_layout(args, chunk_index: int) -> GPTCheckpointLayout:
    pipeline_size = parallel_state.get_pipeline_model_parallel_world_size()
    offset, _ = layer_offset_and_count(
        args.num_layers,
        pipeline_size,
        parallel_state.get_pipeline_model_parallel_rank(),
        args.virtual_pipeline_model_parallel_size,
        chunk_index,
        getattr(args, "decoder_first_pipeline_num_layers", None),
        getattr(args, "decoder_last_pipeline_num_layers", None),
    )
    return GPTCheckpointLayout(
        num_layers=args.num_layers,
        layer_offset=offset,
        stacked=stacks_layers(getattr(args, "moe_layer_freq", 1)),
        tied_output=not args.untie_embeddings_and_output_weights,
        num_experts=getattr(args, "num_experts", None),
        expert_parallel_size=args.expert_model_parallel_size,
    )


def _chunks(model, args):
    """[(named tensors, linear names, layout)] per model chunk."""
    rename = legacy_to_mcore_names if args.use_legacy_models else None
    return [(*checkpoint_tensors(chunk, rename), _chunk_layout(args, index)) for index, chunk in enumerate(unwrap_model(model))]


def model_sharded_state_dict(model, args) -> dict:
    """{"model" or "model{i}": {name: [ShardedTensor / ShardedObject]}} for this rank's chunks."""
    chunks = _chunks(model, args)
    keys = ["model"] if len(chunks) == 1 else [f"model{index}" for index in range(len(chunks))]
    return {key: sharded_model_state(named, linears, layout) for key, (named, linears, layout) in zip(keys, chunks)}


def _optimizer_entries(chunks, states: Dict[torch.nn.Parameter, Dict[str, torch.Tensor]]) -> List[ShardedTensor]:
    """Each parameter's optimizer state as blocks shaped like the parameter's, under optimizer.state.{name}.{key}."""
    entries = []
    for named, _, layout in chunks:
        names = set(named)
        for name, param in named.items():
            for state_name, value in states.get(param, {}).items():
                for block in layout.sharded_tensors(name, value, names, rule=split_rule(param)):
                    block.key = f"{OPTIMIZER_STATE_PREFIX}{state_name}.{block.key}"
                    entries.append(block)
    return entries


def _rng_position() -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(shape, offset) of this rank's rng_state object: per (pipeline, tensor[, expert]) rank."""
    shape = [parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()]
    offset = [parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()]
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        shape.append(parallel_state.get_expert_model_parallel_world_size())
        offset.append(parallel_state.get_expert_model_parallel_rank())
    return tuple(shape), tuple(offset)


# -------------------------------------------------------------------------------------------------- saving


def _checkpoint_group():
    """A gloo group of every rank for the writers' planning collectives: its own, so that a background writer's
    collectives never interleave with training's, and on the CPU, where the plans are (also under NCCL)."""
    global _checkpoint_save_group
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    world = dist.group.WORLD
    if _checkpoint_save_group is None or _checkpoint_save_group[0] is not world:  # one per process group world
        _checkpoint_save_group = (world, dist.new_group(backend="gloo"))
    return _checkpoint_save_group[1]


def save_torch_dist(directory: str, common_state: dict, model, optimizer, rng_state, args, async_save: bool):
    """Write this rank's blocks into `directory` (a collective); rank 0 then writes the common state and
    metadata.json. With `async_save` the blocks are copied now and written in the background: returns the
    AsyncSaveRequest whose finalize() completes it, else None once the directory is complete."""
    chunks = _chunks(model, args)
    sharded = {"model": [entry for named, linears, layout in chunks for blocks in sharded_model_state(named, linears, layout).values() for entry in blocks]}
    if "optimizer" in common_state:
        sharded["optimizer_state"] = _optimizer_entries(chunks, optimizer.param_state_for_checkpoint())
    if rng_state is not None:
        shape, offset = _rng_position()
        sharded["rng_state"] = ShardedObject("rng_state", rng_state, shape, offset)
    state = {**common_state, **sharded}
    return dist_checkpointing.save(state, directory, async_sharded_save=async_save, process_group=_checkpoint_group())


# ------------------------------------------------------------------------------------------------- loading


def _optimizer_state_names(metadata) -> Dict[str, List[str]]:
    """{model checkpoint key: the optimizer state names saved for it}."""
    names: Dict[str, List[str]] = {}
    for key in metadata.state_dict_metadata:
        if key.startswith(OPTIMIZER_STATE_PREFIX):
            state_name, model_key = key[len(OPTIMIZER_STATE_PREFIX) :].split(".", 1)
            names.setdefault(model_key, []).append(state_name)
    return names


def _optimizer_load_targets(chunks, metadata, optimizer) -> Tuple[List[ShardedTensor], Dict[torch.nn.Parameter, Dict[str, torch.Tensor]]]:
    """Empty fp32 tensors for every saved optimizer state of this rank's trainable parameters, and their blocks."""
    saved_names = _optimizer_state_names(metadata)
    trainable = {id(param) for param in _optimized_model_params(optimizer)}
    entries, states = [], {}
    for named, _, layout in chunks:
        names = set(named)
        for name, param in named.items():
            if id(param) not in trainable or param in states:
                continue
            key, _, _ = layout.locate(name, names)
            state = {state_name: torch.empty(param.shape, dtype=torch.float32, device=param.device) for state_name in saved_names.get(key, [])}
            if not state:
                continue
            states[param] = state
            for state_name, value in state.items():
                for block in layout.sharded_tensors(name, value, names, rule=split_rule(param)):
                    block.key = f"{OPTIMIZER_STATE_PREFIX}{state_name}.{block.key}"
                    entries.append(block)
    return entries, states


def _optimized_model_params(optimizer) -> List[torch.nn.Parameter]:
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    params = []
    for inner in optimizers:
        entries = getattr(inner, "entries", None)
        if entries is not None:
            params += [entry.model_param for entry in entries]
        else:
            params += [model_param for model_param, _ in inner._model_and_master_params()]
    return params


def load_torch_dist(model, optimizer, directory: str, args, load_optimizer: bool, load_rng: bool, check_args) -> dict:
    """Load a torch_dist directory into the model (and optimizer) at this run's layout. Returns the common state
    with "rng_state" this rank's saved RNG states (None when not loaded); `check_args(checkpoint_args)` validates
    the saved model flags before any tensor is read."""
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise dist_checkpointing.CheckpointingException(
            f"{directory} is not a complete torch_dist checkpoint (its metadata.json is missing or invalid: the save "
            "was interrupted, or it is another format; pass --ckpt-format torch or --auto-detect-ckpt-format)"
        )
    common = dist_checkpointing.load_common_state_dict(directory)
    if common.get("args") is not None:
        check_args(common["args"])
    metadata = dist_checkpointing.read_checkpoint_metadata(directory)
    chunks = _chunks(model, args)
    entries = [
        entry
        for named, _, layout in chunks
        for name, tensor in named.items()
        for entry in layout.sharded_tensors(name, tensor, set(named))
    ]
    optimizer_states = {}
    if load_optimizer:
        if "optimizer" not in common:
            raise dist_checkpointing.CheckpointingException(
                f"{directory} holds no optimizer state (saved with --no-save-optim?); pass --no-load-optim or --finetune"
            )
        optimizer_entries, optimizer_states = _optimizer_load_targets(chunks, metadata, optimizer)
        entries += optimizer_entries
    shape, offset = _rng_position()
    rng_entry = ShardedObject("rng_state", None, shape, offset)
    objects = []
    if load_rng:
        if rng_entry.unique_key in metadata.state_dict_metadata:
            objects.append(rng_entry)
        else:
            print_rank_0(
                f"WARNING: {directory} holds no RNG state for this parallel layout (saved at another one, or with "
                "--no-save-rng); the random generators continue from this run's seed"
            )
    with torch.no_grad():
        loaded = dist_checkpointing.load_entries(directory, metadata, entries, objects)
    if load_optimizer:
        hyperparameters = common["optimizer"]["hyperparameters"]
        try:
            optimizer.load_hyperparameter_state(hyperparameters)
            optimizer.load_param_state_from_checkpoint(optimizer_states, hyperparameters)
        except (ValueError, KeyError, TypeError) as error:
            raise dist_checkpointing.CheckpointingException(f"the optimizer state in {directory} does not fit this optimizer: {error}") from None
    else:
        optimizer.reload_model_params()
    common["rng_state"] = loaded.get(rng_entry.unique_key)
    return common
