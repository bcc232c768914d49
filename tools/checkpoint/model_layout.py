"""How a full model state dict maps onto the two stacks and onto tensor/pipeline-parallel shards.

The canonical form is the mcore GPTModel's flat state dict at TP=1, PP=1 (global layer numbers). Legacy
names are a renaming of it; shards are slices of it (tensor parallel) and subsets of it with local layer
numbers (pipeline parallel), exactly as each rank's model holds them.
"""

import re
from typing import Dict, List, Tuple

import torch

from megatron.core.transformer.pipeline_layout import layer_offset_and_count
from megatron.core.errors import UserError

StateDict = Dict[str, torch.Tensor]

# (mcore pattern, legacy pattern): per-layer names; {i} is the layer number.
_LAYER_NAMES = [
    ("input_layernorm", "input_norm"),
    ("self_attention.linear_qkv", "self_attention.query_key_value"),
    ("self_attention.linear_proj", "self_attention.dense"),
    ("self_attention.q_layernorm", "self_attention.q_layernorm"),
    ("self_attention.k_layernorm", "self_attention.k_layernorm"),
    ("pre_mlp_layernorm", "post_attention_norm"),
    ("mlp.linear_fc1", "mlp.dense_h_to_4h"),
    ("mlp.linear_fc2", "mlp.dense_4h_to_h"),
]
_TOP_LEVEL_NAMES = [
    ("embedding.word_embeddings.", "language_model.embedding.word_embeddings."),
    ("embedding.position_embeddings.", "language_model.embedding.position_embeddings."),
    ("decoder.final_layernorm.", "language_model.encoder.final_norm."),
]
_MCORE_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LEGACY_LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$")


class LayoutError(UserError, ValueError):
    """Tensors that do not form a complete model of the expected layout."""


def _rename_layer_part(part: str, table, from_index: int, to_index: int) -> str:
    for names in table:
        source = names[from_index]
        if part.startswith(source + "."):
            return names[to_index] + part[len(source):]
    raise LayoutError(f"no {'legacy' if to_index else 'mcore'} name for layer tensor {part!r}")


def mcore_to_legacy_names(state: StateDict, tied: bool) -> StateDict:
    """mcore module names -> legacy module names. In a `tied` model an `output_layer.weight` can only be
    the last pipeline stage's copy of the word embeddings (legacy `word_embeddings.weight`)."""
    renamed = {}
    for name, tensor in state.items():
        match = _MCORE_LAYER.match(name)
        if match:
            part = _rename_layer_part(match.group(2), _LAYER_NAMES, 0, 1)
            renamed[f"language_model.encoder.layers.{match.group(1)}.{part}"] = tensor
        elif name == "output_layer.weight":
            renamed["word_embeddings.weight" if tied else "language_model.output_layer.weight"] = tensor
        else:
            renamed[_rename_prefix(name, 0, 1)] = tensor
    return renamed


def legacy_to_mcore_names(state: StateDict) -> StateDict:
    """Legacy module names (flat) -> mcore module names."""
    renamed = {}
    for name, tensor in state.items():
        match = _LEGACY_LAYER.match(name)
        if match:
            part = _rename_layer_part(match.group(2), _LAYER_NAMES, 1, 0)
            renamed[f"decoder.layers.{match.group(1)}.{part}"] = tensor
        elif name in ("language_model.output_layer.weight", "word_embeddings.weight"):
            renamed["output_layer.weight"] = tensor
        else:
            renamed[_rename_prefix(name, 1, 0)] = tensor
    return renamed


def _rename_prefix(name: str, from_index: int, to_index: int) -> str:
    for names in _TOP_LEVEL_NAMES:
        if name.startswith(names[from_index]):
            return names[to_index] + name[len(names[from_index]):]
    raise LayoutError(f"{name!r} is not a tensor of a GPT model")


_TRANSFORMER_ENGINE_NORMS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def transformer_engine_to_local_names(state: StateDict) -> StateDict:
    """Megatron-LM's Transformer Engine spec fuses each pre-norm into the next linear layer
    (linear_qkv.layer_norm_weight); the local spec names it as its own module (input_layernorm.weight)."""
    renamed = {}
    for name, tensor in state.items():
        match = _MCORE_LAYER.match(name)
        if match:
            for fused, local in _TRANSFORMER_ENGINE_NORMS.items():
                if match.group(2).startswith(fused):
                    name = f"decoder.layers.{match.group(1)}.{local}{match.group(2)[len(fused):]}"
        renamed[name] = tensor
    return renamed


def tensor_parallel_split_rule(name: str, gated_mlp: bool) -> Tuple[int, int]:
    """(dimension split over tensor-parallel ranks or -1 if replicated, stride) of an mcore tensor.

    Column-parallel weights and biases split their rows; row-parallel weights their columns; the gated
    MLP's [gate; up] rows split each half separately (stride 2). Norms, position embeddings and
    row-parallel biases are replicated.
    """
    if name in ("embedding.word_embeddings.weight", "output_layer.weight") or ".self_attention.linear_qkv." in name:
        return 0, 1
    if ".mlp.linear_fc1." in name:
        return 0, 2 if gated_mlp else 1
    if name.endswith(".self_attention.linear_proj.weight") or name.endswith(".mlp.linear_fc2.weight"):
        return 1, 1
    return -1, 1


def split_tensor(tensor: torch.Tensor, parts: int, dim: int, stride: int) -> List[torch.Tensor]:
    """Rank r's slice: the r-th of `parts` pieces of each of the `stride` consecutive blocks, concatenated."""
    if tensor.size(dim) % (parts * stride):
        raise LayoutError(
            f"a dimension of size {tensor.size(dim)} cannot be split into {parts} tensor-parallel shards"
            + (f" of {stride} blocks" if stride > 1 else "")
        )
    pieces = torch.split(tensor, tensor.size(dim) // (parts * stride), dim=dim)
    return [torch.cat(pieces[rank::parts], dim=dim).clone() for rank in range(parts)]


def merge_tensor(shards: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of split_tensor."""
    blocks = [torch.chunk(shard, stride, dim=dim) for shard in shards]
    return torch.cat([blocks[rank][block] for block in range(stride) for rank in range(len(shards))], dim=dim)


def split_tensor_parallel(state: StateDict, parts: int, gated_mlp: bool) -> List[StateDict]:
    shards = [{} for _ in range(parts)]
    for name, tensor in state.items():
        dim, stride = tensor_parallel_split_rule(name, gated_mlp)
        pieces = [tensor] * parts if dim < 0 else split_tensor(tensor, parts, dim, stride)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece
    return shards


def merge_tensor_parallel(shards: List[StateDict], gated_mlp: bool) -> StateDict:
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != names:
            raise LayoutError(f"tensor-parallel rank {rank} holds different tensors than rank 0")
    merged = {}
    for name in names:
        dim, stride = tensor_parallel_split_rule(name, gated_mlp)
        pieces = [shard[name] for shard in shards]
        merged[name] = pieces[0] if dim < 0 else merge_tensor(pieces, dim, stride)
    return merged


def _chunk_layers(args, pipeline_size: int, stage: int, virtual_size: int = 1, chunk: int = 0) -> Tuple[int, int]:
    """(first global layer, layer count) of one pipeline stage's model chunk under the split in `args`."""
    return layer_offset_and_count(
        args.num_layers,
        pipeline_size,
        stage,
        virtual_size=virtual_size,
        virtual_stage=chunk,
        first_stage_layers=getattr(args, "decoder_first_pipeline_num_layers", None),
        last_stage_layers=getattr(args, "decoder_last_pipeline_num_layers", None),
    )


def split_pipeline(state: StateDict, args, pipeline_size: int, tied: bool) -> List[StateDict]:
    """Per-stage state dicts with local layer numbers; the last stage of a tied model with several stages
    gets its own copy of the word embeddings as `output_layer.weight`."""
    stages = [{} for _ in range(pipeline_size)]
    layers = [_chunk_layers(args, pipeline_size, stage) for stage in range(pipeline_size)]
    for name, tensor in state.items():
        match = _MCORE_LAYER.match(name)
        if match:
            index = int(match.group(1))
            stage = next(s for s, (offset, count) in enumerate(layers) if offset <= index < offset + count)
            stages[stage][f"decoder.layers.{index - layers[stage][0]}.{match.group(2)}"] = tensor
        elif name.startswith("embedding."):
            stages[0][name] = tensor
        else:
            stages[-1][name] = tensor
    if tied and pipeline_size > 1:
        stages[-1]["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
    return stages


def merge_pipeline(stages: List[List[StateDict]], args, tied: bool) -> StateDict:
    """Inverse of split_pipeline, also for virtual pipeline chunks: `stages[p][v]` is chunk v of stage p
    (one chunk per stage without virtual stages). The last stage's copy of tied embeddings is dropped."""
    merged = {}
    virtual_size = len(stages[0])
    for stage, chunks in enumerate(stages):
        for chunk, state in enumerate(chunks):
            offset, _ = _chunk_layers(args, len(stages), stage, virtual_size, chunk)
            for name, tensor in state.items():
                match = _MCORE_LAYER.match(name)
                if match:
                    merged[f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"] = tensor
                elif tied and name == "output_layer.weight" and (stage, chunk) != (0, 0):
                    continue
                else:
                    merged[name] = tensor
    return merged
