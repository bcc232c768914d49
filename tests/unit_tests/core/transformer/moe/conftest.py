"""MoE tests: a tiny MoE config and layer builder."""

import torch
import torch.nn.functional as F

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig


def moe_config(**fields) -> TransformerConfig:
    """A one-layer SwiGLU MoE in fp32 without dropout or linear biases; `fields` override."""
    base = dict(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=8,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        moe_router_load_balancing_type="none",
        use_cpu_initialization=True,
        init_method_std=0.5,
    )
    return TransformerConfig(**{**base, **fields})


def moe_layer(config: TransformerConfig, seed: int = 0, **kwargs):
    """An MoELayer built from the local spec with weights drawn from `seed`."""
    torch.manual_seed(seed)
    spec = get_moe_module_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm)
    return build_module(spec, config=config, layer_number=1, **kwargs)
