"""Multi-token prediction (MTP, DeepSeek-V3) with Megatron-core's module names (`mtp.layers.{k}.enorm`, `.hnorm`,
`.eh_proj`, `.transformer_layer`, `.final_layernorm`).

Depth k (1-based) predicts the token k + 1 positions ahead: it embeds the input ids shifted left k times with
the model's own embedding, projects cat(enorm(embedding), hnorm(previous hidden states)) from 2h back to h,
runs one decoder layer (the last decoder layer's kind) and a final norm, and scores the shared output layer
against the labels shifted left k times. The depths' mean loss times mtp_loss_scaling_factor joins the
backward through the main hidden states (as MoE aux losses do); the lm loss itself stays the main loss, and
each depth's loss is logged as `mtp_{k} loss`.
"""

from typing import Callable, Dict, Optional

import torch

from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.pipeline_layout import layout_independent_init
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

# Sum over micro batches of each depth's (detached) loss since the last report: {depth (1-based): loss}.
_MTP_LOSS_TRACKER: Dict[int, torch.Tensor] = {}


def get_mtp_loss_tracker() -> Dict[int, torch.Tensor]:
    return _MTP_LOSS_TRACKER


def clear_mtp_loss_tracker() -> None:
    _MTP_LOSS_TRACKER.clear()


def roll_left(tensor: torch.Tensor) -> torch.Tensor:
    """[b, s] shifted one position left along the sequence, the freed last position zero (Megatron's roll_tensor
    without context parallelism)."""
    rolled = torch.roll(tensor, shifts=-1, dims=-1)
    rolled[..., -1] = 0
    return rolled


class MultiTokenPredictionLayer(MegatronModule):
    """Depth `depth` (from 1): forward(embedded [s, b, h], hidden_states [s, b, h], ...) -> its normed hidden
    states."""

    def __init__(self, config: TransformerConfig, transformer_layer_spec: ModuleSpec, depth: int = 1):
        super().__init__(config)
        self.enorm = WrappedTorchNorm(config, config.hidden_size)
        self.hnorm = WrappedTorchNorm(config, config.hidden_size)
        self.eh_proj = ColumnParallelLinear(
            2 * config.hidden_size,
            config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
        )
        # Megatron's layer number num_layers + depth: its aux losses are logged after the decoder's (the layer is
        # MoE exactly when the last decoder layer is).
        self.transformer_layer = build_module(transformer_layer_spec, config=config, layer_number=config.num_layers + depth)
        self.final_layernorm = WrappedTorchNorm(config, config.hidden_size)

    def forward(self, embedded, hidden_states, attention_mask=None, rotary_pos_emb=None) -> torch.Tensor:
        combined = torch.cat((self.enorm(embedded), self.hnorm(hidden_states)), dim=-1)
        projected, _ = self.eh_proj(combined)
        projected = gather_from_tensor_model_parallel_region(projected)
        if self.config.sequence_parallel:
            projected = scatter_to_sequence_parallel_region(projected)
        output, _ = self.transformer_layer(projected, attention_mask, rotary_pos_emb=rotary_pos_emb)
        return self.final_layernorm(output)


class MultiTokenPredictionBlock(MegatronModule):
    """config.mtp_num_layers depths after the decoder, on the stage that holds the output layer."""

    def __init__(self, config: TransformerConfig, transformer_layer_spec: ModuleSpec):
        super().__init__(config)
        layers = []
        for depth in range(config.mtp_num_layers):
            # Positions after the output layer's (num_layers + 1), so the other modules' weights do not change.
            with layout_independent_init(config, config.num_layers + 2 + depth):
                layers.append(MultiTokenPredictionLayer(config, transformer_layer_spec, depth + 1))
        self.layers = torch.nn.ModuleList(layers)

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        labels: torch.Tensor,
        loss_mask: Optional[torch.Tensor],
        embedding: Callable,
        per_token_loss: Callable,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The main hidden states [s, b, h] with the scaled MTP loss attached to their backward.
        `embedding(ids, positions)` is the model's embedding, `per_token_loss(hidden_states, labels)` its output
        layer's loss [b, s]."""
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.float)
        loss_mask = loss_mask.float()
        previous, total = hidden_states, 0.0
        for depth, layer in enumerate(self.layers, start=1):
            input_ids, position_ids = roll_left(input_ids), roll_left(position_ids)
            labels, loss_mask = roll_left(labels), roll_left(loss_mask)
            previous = layer(embedding(input_ids, position_ids), previous, attention_mask, rotary_pos_emb)
            losses = per_token_loss(previous, labels).float()
            loss = torch.sum(losses * loss_mask) / loss_mask.sum().clamp(min=1)
            if self.training and torch.is_grad_enabled():
                tracked = _MTP_LOSS_TRACKER.get(depth)
                _MTP_LOSS_TRACKER[depth] = loss.detach() if tracked is None else tracked + loss.detach()
            total = total + loss
        scale = self.config.mtp_loss_scaling_factor / len(self.layers)
        return MoEAuxLossAutoScaler.apply(hidden_states, scale * total)
