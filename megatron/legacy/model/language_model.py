"""TransformerLanguageModel: embedding -> ParallelTransformer ("encoder") -> untied output layer."""

from typing import Optional

from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_model import rotary_sequence_length
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.pipeline_layout import layout_independent_init
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.legacy.model.transformer import ParallelTransformer


class TransformerLanguageModel(MegatronModule):
    """Returns the final hidden states [s, b, h] (logits are the GPTModel's job)."""

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        untie_embeddings_and_output_weights: bool = False,
        position_embedding_type: str = "learned_absolute",
        rotary_embedding: Optional[dict] = None,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config)
        self.pre_process = pre_process
        self.post_process = post_process
        if pre_process:
            with layout_independent_init(config, 0):
                self.embedding = LanguageModelEmbedding(config, vocab_size, max_sequence_length, position_embedding_type)
        self.use_rotary_position_embeddings = position_embedding_type == "rope"
        if self.use_rotary_position_embeddings:
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels,
                rotary_interleaved=config.rotary_interleaved,
                use_cpu_initialization=config.use_cpu_initialization,
                **(rotary_embedding or {}),
            )
        self.encoder = ParallelTransformer(
            config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )
        if post_process and untie_embeddings_and_output_weights:
            with layout_independent_init(config, config.num_layers + 1):
                self.output_layer = ColumnParallelLinear(
                    config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False
                )

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, input_ids, position_ids, attention_mask, inference_params=None):
        encoder_input = self.embedding(input_ids, position_ids) if self.pre_process else None
        rotary_pos_emb = None
        if self.use_rotary_position_embeddings:
            reference = encoder_input if encoder_input is not None else self.encoder.input_tensor
            rotary_pos_emb = self.rotary_pos_emb(rotary_sequence_length(self.config, reference, inference_params))
        return self.encoder(encoder_input, attention_mask, inference_params, rotary_pos_emb)
