"""Reading and writing the on-disk forms: Megatron checkpoints (docs/FORMATS.md) in the torch format at any
TP/PP/EP for either stack or in the layout-free torch_dist format, and Hugging Face directories (config.json +
safetensors or pytorch_model.bin).

Everything is written under a temporary name and renamed when complete, the tracker file last.
"""

import argparse
import glob
import json
import os
import re
import pickle
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.gpt_layout import (
    VOCABULARY_TENSORS,
    GPTCheckpointLayout,
    ParallelPlace,
    checkpoint_tensors,
    sharded_model_state,
    stacks_layers,
)
from megatron.core.models.gpt.checkpoint_names import transformer_engine_to_local_names
from megatron.core.tensor_parallel.state_dict_sharding import SplitRule, merge_state_dicts, split_rules, split_state_dict
from megatron.core.transformer.pipeline_layout import merge_pipeline, split_pipeline
from megatron.legacy.model.checkpoint_names import (
    flatten_legacy_state_dict,
    legacy_to_mcore_names,
    mcore_to_legacy_names,
    nest_legacy_state_dict,
)
from megatron.training.checkpointing import (
    CHECKPOINT_BASENAME,
    CHECKPOINT_VERSION,
    RANK_DIRECTORY_NAME,
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    read_metadata,
    write_tracker,
)
from megatron.training.arguments import ModelArgumentsError, model_flag_parser, validate_model_args
from megatron.training.model_config import core_transformer_config_from_args
from megatron.core.safe_load import load_checkpoint_file
from megatron.training.tokenizer import vocab_size_with_padding
from tools.checkpoint.hf_families import ConversionError, pad_vocabulary

StateDict = Dict[str, torch.Tensor]
_EXPERT_KEY = re.compile(r"^(.*\.experts\.local_experts\.)(\d+)(\..*)$")
_TORCH_DIST_FILES = (".metadata", "common.pt")  # present before metadata.json marks the directory complete


def model_args(
    flags: List[str],
    true_vocab_size: int,
    make_vocab_size_divisible_by: int,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    use_legacy_models: bool,
    uneven_stage_layers: Tuple[Optional[int], Optional[int]] = (None, None),
    expert_parallel_size: int = 1,
) -> argparse.Namespace:
    """The model-shaping args saved in a checkpoint, from model flags plus vocabulary and layout
    (`uneven_stage_layers`: the first and last pipeline stages' layer counts, None for an even share)."""
    args = model_flag_parser().parse_args(flags)
    args.use_legacy_models = use_legacy_models
    args.use_mcore_models = not use_legacy_models
    args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers = uneven_stage_layers
    return _complete_args(
        args, true_vocab_size, make_vocab_size_divisible_by, tensor_parallel_size, pipeline_parallel_size,
        expert_parallel_size,
    )


def _complete_args(
    args, true_vocab_size, make_vocab_size_divisible_by, tensor_parallel_size, pipeline_parallel_size, expert_parallel_size
):
    args.tensor_model_parallel_size = tensor_parallel_size
    args.pipeline_model_parallel_size = pipeline_parallel_size
    args.expert_model_parallel_size = expert_parallel_size
    args.expert_tensor_parallel_size = tensor_parallel_size  # experts are written split like the other layers
    if getattr(args, "num_experts", None) and tensor_parallel_size > 1:
        args.sequence_parallel = True  # MoE under tensor parallelism trains with it (the weights do not change)
    args.true_vocab_size = true_vocab_size
    args.make_vocab_size_divisible_by = make_vocab_size_divisible_by
    args.padded_vocab_size = vocab_size_with_padding(
        true_vocab_size, make_vocab_size_divisible_by, tensor_parallel_size
    )
    try:
        validate_model_args(args)
    except ModelArgumentsError as error:
        raise ConversionError(
            f"the model cannot be laid out at tensor-parallel size {tensor_parallel_size} x pipeline-parallel size "
            f"{pipeline_parallel_size} x expert-parallel size {expert_parallel_size} (--target-tensor-parallel-size / "
            f"--target-pipeline-parallel-size / --target-expert-parallel-size / "
            f"--target-decoder-first|last-pipeline-num-layers): {error}"
        ) from None
    return args


def relayout_args(
    args,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    use_legacy_models: bool,
    uneven_stage_layers: Tuple[Optional[int], Optional[int]] = (None, None),
    expert_parallel_size: int = 1,
):
    """A checkpoint's args moved to another layout and stack (the padded vocabulary is recomputed; settings
    that only fit the old layout are dropped). An uneven pipeline split is kept at the same pipeline size
    unless `uneven_stage_layers` (first, last stage layer counts) gives a new one."""
    moved = argparse.Namespace(**vars(args))
    moved.use_legacy_models = use_legacy_models
    moved.use_mcore_models = not use_legacy_models
    moved.sequence_parallel = bool(getattr(args, "sequence_parallel", False)) and tensor_parallel_size > 1
    moved.virtual_pipeline_model_parallel_size = None
    if uneven_stage_layers != (None, None) or pipeline_parallel_size != args.pipeline_model_parallel_size:
        moved.decoder_first_pipeline_num_layers, moved.decoder_last_pipeline_num_layers = uneven_stage_layers
    return _complete_args(
        moved, moved.true_vocab_size, moved.make_vocab_size_divisible_by, tensor_parallel_size, pipeline_parallel_size,
        expert_parallel_size,
    )


def _uneven_stages(args) -> Tuple[Optional[int], Optional[int]]:
    """The first and last pipeline stages' layer counts (None: an even share)."""
    return getattr(args, "decoder_first_pipeline_num_layers", None), getattr(args, "decoder_last_pipeline_num_layers", None)


def unsplit_model(args, **overrides):
    """The mcore model `args` describes at TP=1, PP=1 (any stack's tensors have its names), on the meta
    device: only its names, shapes and parameter attributes are needed. `overrides` replace args."""
    from gpt_builders import gpt_builder

    unsplit = argparse.Namespace(**vars(args))
    unsplit.use_legacy_models = False
    unsplit.tensor_model_parallel_size = unsplit.pipeline_model_parallel_size = unsplit.expert_model_parallel_size = 1
    unsplit.sequence_parallel = False
    unsplit.decoder_first_pipeline_num_layers = unsplit.decoder_last_pipeline_num_layers = None
    unsplit.virtual_pipeline_model_parallel_size = None
    vars(unsplit).update(overrides)
    config = core_transformer_config_from_args(unsplit)
    config.perform_initialization = False
    with torch.device("meta"):
        return gpt_builder(unsplit, config=config)


def tensor_parallel_rules(args) -> Dict[str, SplitRule]:
    """How each tensor of the model `args` describes splits over tensor-parallel ranks, as its parameters
    record it (untied, so that the output layer is there too)."""
    return split_rules(unsplit_model(args, untie_embeddings_and_output_weights=True))


def fit_vocabulary(state: StateDict, args) -> StateDict:
    """Cut the vocabulary rows to the true vocabulary and pad them again for the layout in `args`."""
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:
            state[name] = pad_vocabulary(state[name][: args.true_vocab_size], args.padded_vocab_size)
    return state


def _fill_missing_model_args(args) -> argparse.Namespace:
    """Args saved by another Megatron may lack flags this project adds: give them their defaults."""
    filled = argparse.Namespace(**vars(model_flag_parser().parse_args([])))
    for name, value in vars(args).items():
        setattr(filled, name, value)
    # Transformer Engine checkpoints are read into the local spec's names (transformer_engine_to_local_names).
    filled.transformer_impl = "local"
    # Megatron-LM saves num_query_groups=1 and may save kv_channels=None when grouped-query attention is off.
    if not filled.group_query_attention:
        filled.num_query_groups = filled.num_attention_heads
    if filled.kv_channels is None:
        filled.kv_channels = filled.hidden_size // filled.num_attention_heads
    if getattr(filled, "true_vocab_size", None) is None:
        filled.true_vocab_size = filled.padded_vocab_size
    if getattr(filled, "make_vocab_size_divisible_by", None) is None:
        filled.make_vocab_size_divisible_by = 1
    return filled


def _replace_directory(temporary: str, final: str) -> None:
    """Move a completely written directory into place, replacing an older one."""
    if os.path.exists(final):
        retired = f"{final}.old.{os.getpid()}"
        os.replace(final, retired)
        os.replace(temporary, final)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, final)


def split_experts(state: StateDict, num_experts: Optional[int], expert_parallel_size: int) -> List[StateDict]:
    """Megatron's expert-parallel split: rank e keeps every dense tensor and routed experts
    [e * E / EP, (e + 1) * E / EP), renumbered from 0 (`local_experts.{i}` is local)."""
    if expert_parallel_size == 1:
        return [state]
    per_rank = num_experts // expert_parallel_size
    shards = [{} for _ in range(expert_parallel_size)]
    for name, tensor in state.items():
        match = _EXPERT_KEY.match(name)
        if match is None:
            for shard in shards:
                shard[name] = tensor
            continue
        rank, local = divmod(int(match.group(2)), per_rank)
        shards[rank][f"{match.group(1)}{local}{match.group(3)}"] = tensor
    return shards


def merge_experts(shards: List[StateDict], num_experts: Optional[int]) -> StateDict:
    """The inverse of split_experts: global expert numbers, dense tensors from expert rank 0."""
    if len(shards) == 1:
        return shards[0]
    per_rank = num_experts // len(shards)
    merged = {}
    for rank, shard in enumerate(shards):
        for name, tensor in shard.items():
            match = _EXPERT_KEY.match(name)
            if match is None:
                merged.setdefault(name, tensor)
            else:
                merged[f"{match.group(1)}{rank * per_rank + int(match.group(2))}{match.group(3)}"] = tensor
    return merged


def write_megatron_checkpoint(save_dir: str, args, state: StateDict) -> None:
    """Write the canonical state dict as SAVE/release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt for the layout
    and stack in `args`, then the tracker "release"."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep = getattr(args, "expert_model_parallel_size", 1)
    tied = not args.untie_embeddings_and_output_weights
    rules = tensor_parallel_rules(args)
    os.makedirs(save_dir, exist_ok=True)
    release_dir = get_checkpoint_name(save_dir, 0, release=True, return_base_dir=True)
    staging = f"{release_dir}.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        stages = split_pipeline(state, args.num_layers, pp, tied, *_uneven_stages(args),
                                prediction_embedding=bool(getattr(args, "mtp_num_layers", None)))
        for pipeline_rank, stage in enumerate(stages):
            for tensor_rank, tensor_shard in enumerate(split_state_dict(stage, tp, rules)):
                for expert_rank, shard in enumerate(split_experts(tensor_shard, args.num_experts, ep)):
                    if args.use_legacy_models:
                        shard = nest_legacy_state_dict(mcore_to_legacy_names(shard, tied))
                    final_name = get_checkpoint_name(
                        save_dir,
                        0,
                        release=True,
                        pipeline_parallel=pp > 1,
                        tensor_rank=tensor_rank,
                        pipeline_rank=pipeline_rank,
                        expert_parallel=ep > 1,
                        expert_rank=expert_rank,
                    )
                    name = os.path.join(staging, os.path.relpath(final_name, release_dir))
                    os.makedirs(os.path.dirname(name), exist_ok=True)
                    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0, "model": shard}, name)
        _replace_directory(staging, release_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_tracker(save_dir, "release")


def _rank_files(directory: str, pipeline_parallel: bool, expert_parallel: bool) -> Dict[Tuple[int, int, int], str]:
    """{(tensor, pipeline, expert rank): file}; the suffixes of mp_rank_TT[_PPP][_EEE] are read by the layout
    (Megatron's names alone cannot tell a pipeline rank from an expert rank)."""
    files = {}
    for entry in sorted(os.listdir(directory)):
        match = RANK_DIRECTORY_NAME.match(entry)
        if match:
            suffixes = [int(group) for group in match.groups()[1:] if group is not None]
            pipeline_rank = suffixes.pop(0) if pipeline_parallel and suffixes else 0
            expert_rank = suffixes.pop(0) if expert_parallel and suffixes else 0
            if not suffixes:
                files[(int(match.group(1)), pipeline_rank, expert_rank)] = os.path.join(directory, entry, CHECKPOINT_BASENAME)
    return files


def _checkpoint_directory(load_dir: str) -> str:
    tracker = get_checkpoint_tracker_filename(load_dir)
    if not os.path.isfile(tracker):
        raise ConversionError(
            f"{load_dir} holds no {os.path.basename(tracker)}: it is not a Megatron checkpoint directory"
        )
    iteration, release = read_metadata(tracker)
    return get_checkpoint_name(load_dir, iteration, release, return_base_dir=True)


def _load_rank_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return load_checkpoint_file(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ConversionError(f"{path} cannot be read ({error}); the file is truncated or not a checkpoint") from None


def _stack_state(checkpoint: dict, path: str) -> Tuple[List[StateDict], bool]:
    """(flat mcore-named state of each model chunk, was it legacy) of one rank file: one chunk under "model",
    or virtual pipeline chunks under "model0", "model1", ..."""
    if "model" in checkpoint:
        chunks = [checkpoint["model"]]
    else:
        chunks = [checkpoint[f"model{index}"] for index in range(len(checkpoint)) if f"model{index}" in checkpoint]
        if not chunks:
            raise ConversionError(f"{path} has no 'model' entry: it is not a model checkpoint")
    states, legacy = [], False
    for chunk in chunks:
        flat = flatten_legacy_state_dict(chunk)
        legacy = any(name.startswith("language_model.") for name in flat)
        state = {name: tensor for name, tensor in flat.items() if not name.endswith("._extra_state")}
        states.append(legacy_to_mcore_names(state) if legacy else transformer_engine_to_local_names(state))
    return states, legacy


def read_megatron_checkpoint(load_dir: str) -> Tuple[argparse.Namespace, StateDict]:
    """(args, canonical state dict) of a Megatron checkpoint in either format (told apart by its files): torch
    at any TP/PP/EP, or torch_dist; the args say which stack it was (use_legacy_models)."""
    directory = _checkpoint_directory(load_dir)
    if dist_checkpointing.check_is_distributed_checkpoint(directory):
        return _read_torch_dist_directory(directory)
    entries = sorted(entry for entry in os.listdir(directory) if RANK_DIRECTORY_NAME.match(entry))
    if not entries:
        if any(os.path.exists(os.path.join(directory, name)) for name in _TORCH_DIST_FILES):
            raise ConversionError(
                f"{directory} is an incomplete torch_dist checkpoint (its metadata.json is missing: the save was "
                "interrupted); convert an earlier, complete iteration"
            )
        raise ConversionError(f"{directory} holds no mp_rank_* directories")
    first_path = os.path.join(directory, entries[0], "model_optim_rng.pt")
    first = _load_rank_file(first_path)
    saved = first.get("args")
    if saved is None:
        raise ConversionError(f"{first_path} holds no saved args, so the model's shape is unknown")
    tp = getattr(saved, "tensor_model_parallel_size", 1)
    pp = getattr(saved, "pipeline_model_parallel_size", 1)
    ep = getattr(saved, "expert_model_parallel_size", 1)
    etp = getattr(saved, "expert_tensor_parallel_size", None)
    if getattr(saved, "num_experts", None) and etp not in (None, tp):
        raise ConversionError(
            f"{directory} was saved with --expert-tensor-parallel-size {etp} at --tensor-model-parallel-size {tp}; "
            "the converter reads experts split like the other layers (ETP = TP): resume it at ETP = TP and save again"
        )
    files = _rank_files(directory, pp > 1, ep > 1)
    layout = [(t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)]
    missing = [
        os.path.basename(os.path.dirname(get_checkpoint_name("", 0, False, pp > 1, t, p, ep > 1, e)))
        for t, p, e in layout
        if (t, p, e) not in files
    ]
    if missing:
        layout = f"{tp} x {pp} x {ep} (tensor x pipeline x expert)" if ep > 1 else f"{tp} x {pp} (tensor x pipeline)"
        raise ConversionError(f"{directory} lacks {', '.join(missing)} of its {layout} layout: the checkpoint is incomplete")
    args, legacy, stages = _fill_missing_model_args(saved), False, []
    rules = tensor_parallel_rules(args)
    for pipeline_rank in range(pp):
        shards = []
        for tensor_rank in range(tp):
            expert_shards = []
            for expert_rank in range(ep):
                path = files[(tensor_rank, pipeline_rank, expert_rank)]
                checkpoint = first if path == first_path else _load_rank_file(path)
                chunks, legacy = _stack_state(checkpoint, path)
                if len(chunks) != len((stages or shards or expert_shards or [chunks])[0]):
                    raise ConversionError(f"{path} holds {len(chunks)} model chunks, unlike the other rank files")
                expert_shards.append(chunks)
            shards.append(
                [merge_experts([shard[chunk] for shard in expert_shards], args.num_experts) for chunk in range(len(chunks))]
            )
        stages.append(
            [merge_state_dicts([shard[chunk] for shard in shards], rules) for chunk in range(len(chunks))]
        )
    args.use_legacy_models, args.use_mcore_models = legacy, not legacy
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size = tp, pp, ep
    return args, merge_pipeline(stages, args.num_layers, not args.untie_embeddings_and_output_weights, *_uneven_stages(args))


def _torch_dist_layout(args) -> GPTCheckpointLayout:
    """Where the unsplit model's tensors (global layer numbers, TP1) live in a torch_dist checkpoint."""
    return GPTCheckpointLayout(
        num_layers=args.num_layers,
        layer_offset=0,
        stacked=stacks_layers(getattr(args, "moe_layer_freq", 1)),
        tied_output=not args.untie_embeddings_and_output_weights,
        num_experts=getattr(args, "num_experts", None),
        place=ParallelPlace(),
    )


def read_torch_dist_checkpoint(load_dir: str) -> Tuple[argparse.Namespace, StateDict]:
    """(saved args, canonical state dict) of a torch_dist checkpoint (written by this project or Megatron-LM at
    any layout); the vocabulary keeps its saved padded size."""
    directory = _checkpoint_directory(load_dir)
    if not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise ConversionError(f"{directory} is not a complete torch_dist checkpoint (it has no valid metadata.json)")
    return _read_torch_dist_directory(directory)


def _read_torch_dist_directory(directory: str) -> Tuple[argparse.Namespace, StateDict]:
    common = dist_checkpointing.load_common_state_dict(directory)
    saved = common.get("args") if isinstance(common, dict) else None
    if saved is None:
        raise ConversionError(f"{directory} holds no saved args in its common state, so the model's shape is unknown")
    args = _fill_missing_model_args(saved)
    named, _ = checkpoint_tensors(unsplit_model(args))
    metadata = dist_checkpointing.read_checkpoint_metadata(directory)
    layout = _torch_dist_layout(args)
    names = set(named)
    state, blocks = {}, []
    for name, meta_tensor in named.items():
        saved_tensor = metadata.state_dict_metadata.get(layout.locate(name, names)[0])
        dtype, shape = meta_tensor.dtype, meta_tensor.shape
        if hasattr(saved_tensor, "properties"):
            dtype = saved_tensor.properties.dtype
            if name in VOCABULARY_TENSORS:  # all saved rows (check_state_fits_args names a padding unlike args')
                shape = saved_tensor.size
        state[name] = torch.empty(shape, dtype=dtype)
        blocks += layout.sharded_tensors(name, state[name], names)
    dist_checkpointing.load_entries(directory, metadata, blocks, [])
    return args, state


def write_torch_dist_checkpoint(save_dir: str, args, state: StateDict) -> None:
    """Write the canonical state dict as SAVE/release/ in the torch_dist format (global tensors under
    Megatron-core's keys, an empty `_extra_state` object per decoder / MTP linear layer, common.pt with `args`),
    then the tracker "release". One process writes it all; any layout loads it."""
    _, linears = checkpoint_tensors(unsplit_model(args))
    entries = [entry for blocks in sharded_model_state(state, linears, _torch_dist_layout(args)).values() for entry in blocks]
    common = {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    os.makedirs(save_dir, exist_ok=True)
    release_dir = get_checkpoint_name(save_dir, 0, release=True, return_base_dir=True)
    staging = f"{release_dir}.tmp.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        dist_checkpointing.save({**common, "model": entries}, staging)
        _replace_directory(staging, release_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_tracker(save_dir, "release")


def read_hf_directory(load_dir: str) -> Tuple[dict, StateDict]:
    """(config.json as a dict, every tensor) of a Hugging Face model directory."""
    config_path = os.path.join(load_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{load_dir} holds no config.json: it is not a Hugging Face model directory")
    with open(config_path) as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConversionError(f"{config_path} is not valid JSON: {error}") from None
    return config, _read_hf_tensors(load_dir)


def _read_hf_tensors(load_dir: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    safetensors_files = sorted(glob.glob(os.path.join(load_dir, "*.safetensors")))
    bin_files = sorted(glob.glob(os.path.join(load_dir, "pytorch_model*.bin")))
    if not safetensors_files and not bin_files:
        raise ConversionError(f"{load_dir} holds no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for path in safetensors_files or bin_files:
        try:
            if path.endswith(".safetensors"):
                state.update(load_file(path))
            else:
                state.update(load_checkpoint_file(path))
        except (SafetensorError, RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
            raise ConversionError(f"{path} cannot be read ({error}); the file is truncated or corrupt") from None
    return state


def write_hf_directory(save_dir: str, config, state: StateDict) -> None:
    """config.json + model.safetensors, each written under a temporary name and renamed."""
    from safetensors.torch import save_file

    os.makedirs(save_dir, exist_ok=True)
    weights = os.path.join(save_dir, "model.safetensors")
    temporary = f"{weights}.tmp.{os.getpid()}"
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, temporary, metadata={"format": "pt"})
    os.replace(temporary, weights)
    config_path = os.path.join(save_dir, "config.json")
    temporary = f"{config_path}.tmp.{os.getpid()}"
    config.to_json_file(temporary)
    os.replace(temporary, config_path)


def state_dtype(state: StateDict) -> Optional[torch.dtype]:
    """The floating dtype of the weights (for config.json's torch_dtype)."""
    for tensor in state.values():
        if torch.is_floating_point(tensor):
            return tensor.dtype
    return None
