"""The legacy stack's checkpoint names, in one place: how each mcore tensor is named in the legacy modules,
and how Megatron-LM nests them in a legacy checkpoint ({'language_model': {'embedding': ..., 'encoder': ...,
'output_layer': ...}, 'word_embeddings_for_head': ...}). Checkpoint I/O and the converter read names from here.
"""

import re
from typing import Dict

import torch

from megatron.core.transformer.module import StateDictMismatchError
from megatron.core.transformer.pipeline_layout import DECODER_LAYER_NAME

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
_LEGACY_LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$")


_HEAD_EMBEDDING_KEY = "word_embeddings_for_head"
_SECTIONS = {
    "language_model.embedding.": ("language_model", "embedding"),
    "language_model.encoder.": ("language_model", "encoder"),
    "language_model.output_layer.": ("language_model", "output_layer"),
    "word_embeddings.": (_HEAD_EMBEDDING_KEY,),
}


def nest_legacy_state_dict(flat: dict) -> dict:
    """Flat module keys -> Megatron-LM's nested legacy checkpoint layout."""
    nested = {}
    for name, tensor in flat.items():
        for prefix, path in _SECTIONS.items():
            if name.startswith(prefix):
                break
        else:
            raise KeyError(f"{name} belongs to no section of a legacy checkpoint")
        rest = name[len(prefix):]
        node = nested
        for key in path:
            node = node.setdefault(key, {})
        if path[-1] == "embedding":
            # Embeddings nest one level deeper: {'word_embeddings': {'weight': ...}}.
            module, parameter = rest.split(".", 1)
            node = node.setdefault(module, {})
            rest = parameter
        node[rest] = tensor
    return nested


def flatten_legacy_state_dict(state_dict: dict) -> dict:
    """Nested legacy checkpoint (or an already flat one) -> flat module keys."""
    flat = {}

    def visit(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                visit(name + ".", value)
            else:
                flat[name] = value

    visit("", state_dict)
    head = _HEAD_EMBEDDING_KEY + "."
    return {
        ("word_embeddings." + name[len(head):] if name.startswith(head) else name): value
        for name, value in flat.items()
    }



def _rename_layer_part(part: str, table, from_index: int, to_index: int) -> str:
    for names in table:
        source = names[from_index]
        if part.startswith(source + "."):
            return names[to_index] + part[len(source):]
    raise StateDictMismatchError(f"no {'legacy' if to_index else 'mcore'} name for layer tensor {part!r}")


def mcore_to_legacy_names(state: StateDict, tied: bool) -> StateDict:
    """mcore module names -> legacy module names. In a `tied` model an `output_layer.weight` can only be
    the last pipeline stage's copy of the word embeddings (legacy `word_embeddings.weight`)."""
    renamed = {}
    for name, tensor in state.items():
        match = DECODER_LAYER_NAME.match(name)
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
    raise StateDictMismatchError(f"{name!r} is not a tensor of a GPT model")
