"""Where each tensor of a GPT model chunk lives in a Megatron `torch_dist` checkpoint.

Megatron-core (local spec, megatron-core 0.16.1) saves global tensors under these keys:
- `embedding.word_embeddings.weight`, `output_layer.weight` [padded vocab, H] (a tied output layer, and the
  embedding copies of later pipeline stages, are replicas of the embedding);
- decoder layers either stacked on a leading layer axis, `decoder.layers.{name}` [L, ...], when every layer has
  the same spec (`moe_layer_freq` the int 1), or per layer, `decoder.layers.{global index}.{name}`;
- the pre-norms under Transformer Engine's names where the layer has a fused QKV projection
  (`input_layernorm.` -> `self_attention.linear_qkv.layer_norm_`, `pre_mlp_layernorm.` -> `mlp.linear_fc1.layer_norm_`);
- routed experts on an expert axis, `...mlp.experts.experts.{linear_fc1|linear_fc2}.weight` [(L,) E, ...];
- tensor-parallel weights whole: a split along `partition_dim` is a block at rank x local size, and SwiGLU's
  [gate; up] (stride 2) is two blocks, gate at rank and up at TP + rank, so the stored tensor is [all gate; all
  up] at any TP;
- an empty `{linear}._extra_state` object per linear layer of the decoder and MTP (Transformer Engine's slot).
The split of every tensor comes from the attributes its parallel layer recorded (state_dict_sharding.py).
"""

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.state_dict_sharding import split_rule

ShardedEntry = Union[ShardedTensor, ShardedObject]
_DECODER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_MTP_LAYER = re.compile(r"^(mtp\.layers\.\d+\.)(.+)$")
_LOCAL_EXPERT = re.compile(r"^(.*)\.experts\.local_experts\.(\d+)\.(.+)$")
_FUSED_NORM_NAMES = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"), ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
VOCABULARY_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class ParallelPlace:
    """This rank's coordinates: tensor and expert-tensor parallel (rank, size), expert-parallel rank."""

    tensor: Tuple[int, int] = (0, 1)
    expert_tensor: Tuple[int, int] = (0, 1)
    expert_rank: int = 0

    @classmethod
    def of_this_rank(cls) -> "ParallelPlace":
        if not parallel_state.model_parallel_is_initialized():
            return cls()
        return cls(
            (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()),
            (parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size()),
            parallel_state.get_expert_model_parallel_rank(),
        )


def stacks_layers(moe_layer_freq) -> bool:
    """Megatron stacks the decoder layers on one axis unless the layers differ (`moe_layer_freq` a list or > 1)."""
    frequency = moe_layer_freq
    return not (isinstance(frequency, (list, tuple)) or (isinstance(frequency, int) and frequency > 1))


def _layer_name(name_in_layer: str, fused_qkv: bool) -> str:
    if fused_qkv:
        for local, fused in _FUSED_NORM_NAMES:
            if name_in_layer.startswith(local):
                return fused + name_in_layer[len(local) :]
    return name_in_layer


class GPTCheckpointLayout:
    """Maps a model chunk's (mcore-named, stage-local) state dict names to checkpoint keys and blocks.

    `layer_offset`: the global index of the chunk's first decoder layer; `stacked`: Megatron's layer-axis form
    (stacks_layers); `tied_output`: the output layer shares the word embeddings."""

    def __init__(
        self,
        num_layers: int,
        layer_offset: int,
        stacked: bool,
        tied_output: bool,
        num_experts: Optional[int] = None,
        expert_parallel_size: int = 1,
        place: Optional[ParallelPlace] = None,
    ):
        self.num_layers = num_layers
        self.layer_offset = layer_offset
        self.stacked = stacked
        self.tied_output = tied_output
        self.place = place or ParallelPlace.of_this_rank()
        self.num_experts = num_experts or 0
        self.expert_offset = self.place.expert_rank * (self.num_experts // expert_parallel_size)

    def _fused_qkv(self, layer_prefix: str, names: Iterable[str]) -> bool:
        return f"{layer_prefix}self_attention.linear_qkv.weight" in names

    def locate(self, name: str, names) -> Tuple[str, List[Tuple[int, int]], bool]:
        """(checkpoint key, leading (offset, size) axes that exist only globally, is it a routed expert's)."""
        if name == "output_layer.weight" and self.tied_output:
            return "embedding.word_embeddings.weight", [], False
        axes, prefix, rest = [], "", name
        layer = _DECODER_LAYER.match(name)
        mtp = _MTP_LAYER.match(name)
        if layer:
            index, rest = int(layer.group(1)), layer.group(2)
            rest = _layer_name(rest, self._fused_qkv(f"decoder.layers.{index}.", names))
            global_index = self.layer_offset + index
            if self.stacked:
                prefix, axes = "decoder.layers.", [(global_index, self.num_layers)]
            else:
                prefix = f"decoder.layers.{global_index}."
        elif mtp:
            prefix, rest = mtp.group(1), mtp.group(2)
            if rest.startswith("transformer_layer."):
                inner = rest[len("transformer_layer.") :]
                rest = "transformer_layer." + _layer_name(inner, self._fused_qkv(f"{prefix}transformer_layer.", names))
        expert = _LOCAL_EXPERT.match(rest)
        if expert:
            rest = f"{expert.group(1)}.experts.experts.{expert.group(3)}"
            axes.append((self.expert_offset + int(expert.group(2)), self.num_experts))
        return prefix + rest, axes, bool(expert)

    def sharded_tensors(self, name: str, tensor: torch.Tensor, names, rule=None) -> List[ShardedTensor]:
        """The blocks `tensor` (this rank's `name`) is of its global tensor: one, or two for SwiGLU's fc1.
        `rule`: the tensor-parallel split (default: what the tensor records; optimizer state passes its
        parameter's)."""
        key, axes, is_expert = self.locate(name, names)
        rank, size = self.place.expert_tensor if is_expert else self.place.tensor
        dim, stride = rule or split_rule(tensor)
        lead_offsets = tuple(offset for offset, _ in axes)
        lead_sizes = tuple(total for _, total in axes)
        mismatch_allowed = name in VOCABULARY_TENSORS
        if dim < 0 or size == 1:
            return [
                ShardedTensor(key, tensor, lead_sizes + tuple(tensor.shape), lead_offsets + (0,) * tensor.dim(), len(axes), allow_shape_mismatch=mismatch_allowed)
            ]
        global_shape = list(tensor.shape)
        global_shape[dim] *= size
        piece = tensor.shape[dim] // stride
        blocks = []
        for block in range(stride):
            offsets = [0] * tensor.dim()
            offsets[dim] = block * piece * size + rank * piece
            blocks.append(
                ShardedTensor(
                    key,
                    tensor.narrow(dim, block * piece, piece),
                    lead_sizes + tuple(global_shape),
                    lead_offsets + tuple(offsets),
                    len(axes),
                    allow_shape_mismatch=mismatch_allowed,
                )
            )
        return blocks

    def extra_state(self, module_name: str, names) -> ShardedObject:
        """Megatron's (empty) `_extra_state` object of one linear layer."""
        key, axes, _ = self.locate(f"{module_name}._extra_state", names)
        if not axes:
            return ShardedObject(key, None, (1,), (0,))
        return ShardedObject(key, None, tuple(total for _, total in axes), tuple(offset for offset, _ in axes))


def sharded_model_state(
    named_tensors: Dict[str, torch.Tensor],
    linear_module_names: Iterable[str],
    layout: GPTCheckpointLayout,
) -> Dict[str, List[ShardedEntry]]:
    """{state dict name: its blocks} for a chunk's tensors, plus one `_extra_state` object per decoder / MTP
    linear layer."""
    names = set(named_tensors)
    sharded = {name: layout.sharded_tensors(name, tensor, names) for name, tensor in named_tensors.items()}
    for module_name in linear_module_names:
        if module_name.startswith(("decoder.", "mtp.")):
            sharded[f"{module_name}._extra_state"] = [layout.extra_state(module_name, names)]
    return sharded


def checkpoint_tensors(
    module: torch.nn.Module, rename: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """({name: live tensor} of a model chunk's state dict, the names of its linear layers); `rename` maps the
    names to mcore's (the legacy stack's), and the linear layers follow their weights' new names."""
    named = {name: tensor for name, tensor in module.state_dict(keep_vars=True).items() if torch.is_tensor(tensor)}
    if rename is not None:
        named = rename(named)
    linear_weights = {
        id(layer.weight)
        for layer in module.modules()
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)) and getattr(layer, "weight", None) is not None
    }
    linears = [name[: -len(".weight")] for name, tensor in named.items() if id(tensor) in linear_weights and name.endswith(".weight")]
    return named, linears
