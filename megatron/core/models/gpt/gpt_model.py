"""GPTModel: embedding -> TransformerBlock -> final norm -> output layer, for one pipeline stage."""

from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.gpt_layout import (
    GPTCheckpointLayout,
    checkpoint_tensors,
    sharded_model_state,
    stacks_layers,
)
from megatron.core.inference_params import InferenceParams
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import (
    RotaryEmbedding,
    rotary_angles_on_this_cp_rank,
)
from megatron.core.models.common.language_module.language_module import (
    LanguageModule,
    output_logits_or_loss,
    single_input_tensor,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock
from megatron.core.transformer.pipeline_layout import layout_independent_init
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "none")


def check_position_embedding_type(position_embedding_type: str) -> None:
    if position_embedding_type not in POSITION_EMBEDDING_TYPES:
        raise ValueError(
            f"position_embedding_type {position_embedding_type!r}: "
            f"choose one of {', '.join(POSITION_EMBEDDING_TYPES)}"
        )


def rotary_sequence_length(
    config: TransformerConfig, hidden_states: torch.Tensor, inference_params: Optional[InferenceParams]
) -> int:
    """Positions the rotary table must cover: the cache length when generating, else the full sequence
    (the local sequence times the tensor-parallel size when it is sharded, times the context-parallel size)."""
    if inference_params is not None:
        return inference_params.max_sequence_length
    length = hidden_states.size(0) * parallel_state.get_context_parallel_world_size()
    if config.sequence_parallel:
        length *= parallel_state.get_tensor_model_parallel_world_size()
    return length


class GPTModel(LanguageModule):
    """A decoder-only language model (Megatron-core constructor and forward signatures).

    forward returns logits [b, s, vocab/tp] when `labels` is None, else the per-token loss [b, s];
    stages other than the last return their hidden states [s, b, h].
    """

    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "learned_absolute",
        rotary_percent: float = 1.0,
        rotary_base: float = 10000,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
        rope_scaling_low_freq_factor: float = 1.0,
        rope_scaling_high_freq_factor: float = 4.0,
        rope_scaling_original_max_position_embeddings: int = 8192,
        seq_len_interpolation_factor: Optional[float] = None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config)
        check_position_embedding_type(position_embedding_type)
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type
        self.vp_stage = vp_stage

        # Multi-token prediction embeds tokens on the last stage: when another stage holds the word embeddings, the
        # last stage keeps a copy tied to them like a shared output layer (Megatron's placement of the depths).
        self.embedding_tied_for_prediction = bool(config.mtp_num_layers) and pre_process != post_process
        if pre_process or (post_process and self.embedding_tied_for_prediction):
            with layout_independent_init(config, 0):
                self.embedding = LanguageModelEmbedding(config, vocab_size, max_sequence_length, position_embedding_type)
        # Multi-latent attention rotates its own position channels with its own (YaRN) table.
        self.shares_rotary_table = position_embedding_type == "rope" and not config.multi_latent_attention
        if self.shares_rotary_table:
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels,
                rotary_percent=rotary_percent,
                rotary_interleaved=config.rotary_interleaved,
                seq_len_interpolation_factor=seq_len_interpolation_factor,
                rotary_base=rotary_base,
                rope_scaling=rope_scaling,
                rope_scaling_factor=rope_scaling_factor,
                rope_scaling_low_freq_factor=rope_scaling_low_freq_factor,
                rope_scaling_high_freq_factor=rope_scaling_high_freq_factor,
                rope_scaling_original_max_position_embeddings=rope_scaling_original_max_position_embeddings,
                use_cpu_initialization=config.use_cpu_initialization,
            )
        self.decoder = TransformerBlock(
            config, transformer_layer_spec, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )
        if post_process:
            with layout_independent_init(config, config.num_layers + 1):
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size,
                    vocab_size,
                    config=config,
                    init_method=config.init_method,
                    bias=False,
                    gather_output=False,
                    skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                )
        self.mtp = None
        if post_process and config.mtp_num_layers:
            if share_embeddings_and_output_weights and not pre_process:
                raise ValueError(
                    "multi-token prediction over pipeline stages needs untied embeddings "
                    "(--untie-embeddings-and-output-weights)"
                )
            self.mtp = MultiTokenPredictionBlock(config, transformer_layer_spec)
        self.setup_embeddings_and_output_layer()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """Megatron's view of this chunk for `dist_checkpointing.save` / `load`: {state dict name: ShardedTensor,
        a list of them (SwiGLU's gate and up blocks) or a ShardedObject}, under megatron-core's checkpoint keys
        (gpt_layout.py). The data are the live tensors, so `dist_checkpointing.load` fills the model in place."""
        layers = self.decoder.layers
        layout = GPTCheckpointLayout(
            num_layers=self.config.num_layers,
            layer_offset=layers[0].layer_number - 1 if len(layers) else 0,
            stacked=stacks_layers(self.config.moe_layer_freq),
            tied_output=self.share_embeddings_and_output_weights,
            num_experts=self.config.num_moe_experts,
            expert_parallel_size=self.config.expert_model_parallel_size,
        )
        sharded = sharded_model_state(*checkpoint_tensors(self), layout)
        return {prefix + name: entries[0] if len(entries) == 1 else entries for name, entries in sharded.items()}

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand in the previous stage's activations."""
        self.decoder.set_input_tensor(single_input_tensor(input_tensor))

    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        decoder_input: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
        loss_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`loss_mask` [b, s] weighs the multi-token prediction losses (all tokens when None); they are computed
        in training with labels, and join the backward without changing the returned main loss."""
        if inference_params is not None and parallel_state.get_context_parallel_world_size() > 1:
            raise ValueError("generation with a key/value cache runs without context parallelism")
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids, position_ids)

        rotary_pos_emb = None
        if self.shares_rotary_table:
            reference = decoder_input if decoder_input is not None else self.decoder.input_tensor
            rotary_pos_emb = self.rotary_pos_emb(rotary_sequence_length(self.config, reference, inference_params))
            rotary_pos_emb = rotary_angles_on_this_cp_rank(rotary_pos_emb)

        hidden_states = self.decoder(decoder_input, attention_mask, inference_params, rotary_pos_emb)
        if not self.post_process:
            return hidden_states

        output_weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

        def per_token_loss_or_logits(states, targets):
            return output_logits_or_loss(
                self.output_layer,
                states,
                output_weight,
                targets,
                self.parallel_output,
                self.fp16_lm_cross_entropy,
                self.config.fused_output_cross_entropy,
            )

        if self.mtp is not None and labels is not None and torch.is_grad_enabled():
            hidden_states = self.mtp(
                hidden_states, input_ids, position_ids, labels, loss_mask, self.embedding, per_token_loss_or_logits,
                attention_mask, rotary_pos_emb,
            )
        return per_token_loss_or_logits(hidden_states, labels)
