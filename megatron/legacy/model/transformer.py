"""The legacy transformer: ParallelTransformer of ParallelTransformerLayers (ParallelAttention, ParallelMLP).

Module and state-dict names are Megatron-LM's legacy ones (query_key_value, dense, dense_h_to_4h,
input_norm, final_norm, ...); the arithmetic is megatron.core's (the same parallel layers, attention
path, activations, residual block and layer loop), so both stacks give the same numbers.
"""

from typing import Optional

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.mlp import build_mlp_projections, mlp_forward
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm, build_head_norm
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import pre_norm_residual_block


class ParallelMLP(MegatronModule):
    """h -> 4h (x2 with SwiGLU: [gate; up]) -> activation -> h; returns (output, output_bias)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config)
        self.dense_h_to_4h, self.dense_4h_to_h = build_mlp_projections(config, ColumnParallelLinear, RowParallelLinear)

    def forward(self, hidden_states):
        return mlp_forward(self.dense_h_to_4h, self.dense_4h_to_h, hidden_states, self.config)


class ParallelAttention(Attention):
    """Causal self-attention over grouped-query heads split across tensor-parallel ranks."""

    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__(config, layer_number)
        self.query_key_value, self.dense = self.build_projections(ColumnParallelLinear, RowParallelLinear)
        if config.qk_layernorm:
            self.q_layernorm = build_head_norm(config, self.head_dim)
            self.k_layernorm = build_head_norm(config, self.head_dim)
        self.core_attention = DotProductAttention(config, layer_number)

    def forward(self, hidden_states, attention_mask, inference_params=None, rotary_pos_emb=None):
        mixed, _ = self.query_key_value(hidden_states)
        return self.dense(self.attend(mixed, attention_mask, inference_params, rotary_pos_emb))


class ParallelTransformerLayer(MegatronModule):
    """input_norm -> self_attention -> residual -> post_attention_norm -> mlp -> residual."""

    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__(config)
        self.layer_number = layer_number
        self.input_norm = WrappedTorchNorm(config, config.hidden_size)
        self.self_attention = ParallelAttention(config, layer_number)
        self.post_attention_norm = WrappedTorchNorm(config, config.hidden_size)
        self.mlp = ParallelMLP(config)

    def forward(self, hidden_states, attention_mask, inference_params=None, rotary_pos_emb=None):
        return pre_norm_residual_block(
            self, self.input_norm, self.self_attention, self.post_attention_norm, self.mlp,
            hidden_states, attention_mask, inference_params, rotary_pos_emb,
        )


class ParallelTransformer(TransformerBlock):
    """This pipeline stage's layers (core's layer loop, recomputation included), and final_norm on the last
    stage."""

    def __init__(
        self,
        config: TransformerConfig,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(
            config,
            ModuleSpec(module=ParallelTransformerLayer),
            post_layer_norm=False,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.final_norm = WrappedTorchNorm(config, config.hidden_size)

    def forward(self, hidden_states, attention_mask, inference_params=None, rotary_pos_emb=None):
        hidden_states = super().forward(hidden_states, attention_mask, inference_params, rotary_pos_emb)
        return self.final_norm(hidden_states) if self.post_process else hidden_states
