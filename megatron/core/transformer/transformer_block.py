"""The stack of decoder layers this pipeline stage owns, plus the final norm on the last stage."""

import contextlib
from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.inference_params import InferenceParams
from megatron.core.tensor_parallel.random import checkpoint, get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.pipeline_layout import layer_offset_and_count, layout_independent_init
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig


def layer_offset_and_count_for_this_rank(config: TransformerConfig, vp_stage: Optional[int] = None):
    """(first global layer index, number of layers) of this rank's model chunk (`vp_stage` None: the
    virtual stage parallel_state is set to, as Megatron-LM's model providers expect)."""
    if vp_stage is None:
        vp_stage = parallel_state.get_virtual_pipeline_model_parallel_rank()
    return layer_offset_and_count(
        config.num_layers,
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_rank(),
        config.virtual_pipeline_model_parallel_size,
        vp_stage,
        config.num_layers_in_first_pipeline_stage,
        config.num_layers_in_last_pipeline_stage,
    )


class TransformerBlock(MegatronModule):
    """Decoder layers (global numbers offset+1 .. offset+count) and, when `post_process`, the final norm."""

    def __init__(
        self,
        config: TransformerConfig,
        spec: ModuleSpec,
        post_layer_norm: bool = True,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config)
        self.pre_process = pre_process
        self.post_process = post_process
        self.input_tensor = None
        offset, count = layer_offset_and_count_for_this_rank(config, vp_stage)
        self.layers = torch.nn.ModuleList(self._build_layer(spec, offset + index + 1) for index in range(count))
        if post_process and post_layer_norm:
            self.final_layernorm = WrappedTorchNorm(config, config.hidden_size)
        else:
            self.final_layernorm = None

    def _build_layer(self, spec: ModuleSpec, layer_number: int) -> torch.nn.Module:
        with layout_independent_init(self.config, layer_number):
            return build_module(spec, config=self.config, layer_number=layer_number)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """The activations received from the previous pipeline stage replace the embedding output."""
        self.input_tensor = input_tensor

    def forward(
        self,
        hidden_states: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor
        # With sequence parallelism each rank holds a different part of the sequence: its dropout masks
        # must come from the rank-specific stream.
        if self.config.sequence_parallel:
            rng_context = get_cuda_rng_tracker().fork()
        else:
            rng_context = contextlib.nullcontext()
        with rng_context:
            recompute = (
                self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
            )
            for start, stop, recomputed in self._layer_groups(recompute):
                if recomputed:
                    hidden_states = checkpoint(
                        self._run_layers(start, stop, None), False, hidden_states, attention_mask, rotary_pos_emb
                    )
                else:
                    hidden_states = self._run_layers(start, stop, inference_params)(
                        hidden_states, attention_mask, rotary_pos_emb
                    )
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states

    def _run_layers(self, start: int, stop: int, inference_params: Optional[InferenceParams]):
        def run(hidden_states, attention_mask, rotary_pos_emb):
            for layer in self.layers[start:stop]:
                output = layer(hidden_states, attention_mask, inference_params, rotary_pos_emb)
                # Core layers return (hidden_states, context) as in Megatron-core; legacy layers a tensor.
                hidden_states = output[0] if isinstance(output, tuple) else output
            return hidden_states

        return run

    def _layer_groups(self, recompute: bool):
        """(start, stop, recomputed) runs of layers: all at once, or chunks whose activations are recomputed
        in the backward pass (`uniform`: every chunk of recompute_num_layers; `block`: only the first
        recompute_num_layers layers of this stage)."""
        count = len(self.layers)
        if not recompute:
            return [(0, count, False)]
        size = self.config.recompute_num_layers
        if self.config.recompute_method == "uniform":
            return [(start, min(start + size, count), True) for start in range(0, count, size)]
        recomputed = min(size, count)
        groups = [(index, index + 1, True) for index in range(recomputed)]
        if recomputed < count:
            groups.append((recomputed, count, False))
        return groups
