"""The legacy GPTModel: TransformerLanguageModel + logits through the (tied or untied) output weight.

Checkpoints use Megatron-LM's legacy nesting ({'language_model': {'embedding': ..., 'encoder': ...,
'output_layer': ...}, 'word_embeddings_for_head': ...}); loading accepts that or the flat torch form.
"""

from typing import Optional

import torch

from megatron.core.models.common.language_module.language_module import (
    output_logits_or_loss,
    single_input_tensor,
    tie_word_embeddings_across_pipeline,
)
from megatron.core.models.gpt.gpt_model import check_position_embedding_type
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.legacy.model.checkpoint_names import flatten_legacy_state_dict, nest_legacy_state_dict
from megatron.legacy.model.language_model import TransformerLanguageModel

class GPTModel(MegatronModule):
    """Legacy GPT, built with the same keywords as megatron.core's GPTModel minus the layer spec
    (`rotary_kwargs`: RotaryEmbedding's rotary_percent, rotary_base, rope_scaling, ...).

    forward returns logits [b, s, vocab/tp] when `labels` is None, else the per-token loss [b, s];
    stages other than the last return their hidden states [s, b, h].
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        fp16_lm_cross_entropy: bool = False,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = True,
        position_embedding_type: str = "learned_absolute",
        vp_stage: Optional[int] = None,
        **rotary_kwargs,
    ):
        super().__init__(config)
        check_position_embedding_type(position_embedding_type)
        self.pre_process = pre_process
        self.post_process = post_process
        self.fp16_lm_cross_entropy = fp16_lm_cross_entropy
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.parallel_output = parallel_output
        self.vp_stage = vp_stage
        self.language_model = TransformerLanguageModel(
            config,
            vocab_size,
            max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            untie_embeddings_and_output_weights=not share_embeddings_and_output_weights,
            position_embedding_type=position_embedding_type,
            rotary_embedding=rotary_kwargs,
            vp_stage=vp_stage,
        )
        if post_process:
            # Logits through a weight passed at call time: the word embeddings or the untied output layer.
            self.logits_projection = ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=True,
            )
        if share_embeddings_and_output_weights:
            if pre_process:
                tie_word_embeddings_across_pipeline(
                    self.shared_embedding_or_output_weight(), holds_input_embedding=True
                )
            elif post_process:
                self.word_embeddings = VocabParallelEmbedding(
                    vocab_size, config.hidden_size, init_method=config.init_method, config=config
                )
                tie_word_embeddings_across_pipeline(self.word_embeddings.weight, holds_input_embedding=False)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        if self.pre_process:
            return self.language_model.embedding.word_embeddings.weight
        return self.word_embeddings.weight

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(single_input_tensor(input_tensor))

    def forward(self, input_ids, position_ids, attention_mask, labels=None, inference_params=None):
        hidden_states = self.language_model(input_ids, position_ids, attention_mask, inference_params)
        if not self.post_process:
            return hidden_states
        if self.share_embeddings_and_output_weights:
            output_weight = self.shared_embedding_or_output_weight()
        else:
            output_weight = self.language_model.output_layer.weight
        return output_logits_or_loss(
            self.logits_projection,
            hidden_states,
            output_weight,
            labels,
            self.parallel_output,
            self.fp16_lm_cross_entropy,
            self.config.fused_output_cross_entropy,
        )

    def state_dict_for_save_checkpoint(self, prefix: str = "", keep_vars: bool = False):
        return nest_legacy_state_dict(self.state_dict(prefix=prefix, keep_vars=keep_vars))

    def load_state_dict(self, state_dict, strict: bool = True):
        return super().load_state_dict(flatten_legacy_state_dict(state_dict), strict=strict)
