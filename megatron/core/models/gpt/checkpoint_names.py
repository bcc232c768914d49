"""The mcore GPT model's checkpoint names under Megatron-LM's two layer specs.

Megatron-LM's Transformer Engine spec fuses each pre-norm into the next linear layer
(`linear_qkv.layer_norm_weight`); the local spec names it as its own module (`input_layernorm.weight`).
"""

from typing import Dict

import torch

from megatron.core.transformer.pipeline_layout import DECODER_LAYER_NAME

StateDict = Dict[str, torch.Tensor]

_TRANSFORMER_ENGINE_NORMS = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def transformer_engine_to_local_names(state: StateDict) -> StateDict:
    """A checkpoint written with the Transformer Engine spec, in the local spec's names."""
    renamed = {}
    for name, tensor in state.items():
        match = DECODER_LAYER_NAME.match(name)
        if match:
            for fused, local in _TRANSFORMER_ENGINE_NORMS.items():
                if match.group(2).startswith(fused):
                    name = f"decoder.layers.{match.group(1)}.{local}{match.group(2)[len(fused):]}"
        renamed[name] = tensor
    return renamed
