"""LanguageModule: what every language model shares: the loss over vocab-parallel logits and the word
embeddings tied between the first and last pipeline stages."""

from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import (
    linear_vocab_parallel_cross_entropy,
    vocab_parallel_cross_entropy,
)
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule


def language_model_loss(labels: torch.Tensor, logits: torch.Tensor, fp16_lm_cross_entropy: bool) -> torch.Tensor:
    """Per-token cross entropy [b, s] from labels [b, s] and sequence-first logits [s, b, v/tp]."""
    if not fp16_lm_cross_entropy:
        logits = logits.float()
    loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
    return loss.transpose(0, 1).contiguous()


def output_logits_or_loss(
    output_layer,
    hidden_states,
    weight,
    labels,
    parallel_output: bool,
    fp16_lm_cross_entropy: bool,
    fused_output_cross_entropy: bool,
) -> torch.Tensor:
    """The last stage's tail: logits [b, s, v/tp] (all of v unless `parallel_output`), or with `labels` the
    per-token loss [b, s] computed on the vocab-parallel logits. `fused_output_cross_entropy` computes that loss
    chunk by chunk from the output layer's input (fp32 cross entropy only; the layer has no bias)."""
    if labels is not None and fused_output_cross_entropy and not fp16_lm_cross_entropy:
        loss = linear_vocab_parallel_cross_entropy(
            output_layer.parallel_input(hidden_states),
            output_layer.weight_for_forward(weight),
            labels.transpose(0, 1),
            output_layer.gradient_accumulation_fusion,
        )
        return loss.transpose(0, 1).contiguous()
    logits, _ = output_layer(hidden_states, weight=weight)
    if labels is not None:
        return language_model_loss(labels, logits, fp16_lm_cross_entropy)
    if not parallel_output:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits.transpose(0, 1).contiguous()


def single_input_tensor(input_tensor):
    """Pipeline schedules hand a stage a list of one tensor (or the tensor itself)."""
    if isinstance(input_tensor, (list, tuple)):
        if len(input_tensor) != 1:
            raise ValueError(f"a GPT stage takes one input tensor, got {len(input_tensor)}")
        return input_tensor[0]
    return input_tensor


def tie_word_embeddings_across_pipeline(weight: torch.Tensor, holds_input_embedding: bool) -> None:
    """Make the last stage's output weight a copy of the first stage's word embeddings.

    The output copy starts at zero and is summed with the real one over the embedding group; `shared_embedding`
    marks both so their gradients are summed over that group after every backward pass.
    """
    weight.shared_embedding = True
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not holds_input_embedding:
        weight.data.fill_(0)
        weight.shared = True
    if parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        torch.distributed.all_reduce(weight.data, group=parallel_state.get_embedding_group())


class LanguageModule(MegatronModule):
    """Base of GPTModel: the embedding/output-layer tie."""

    # Multi-token prediction on a last pipeline stage that does not hold the word embeddings: that stage keeps a
    # copy of them, tied to the first stage's (GPTModel sets this on both end stages).
    embedding_tied_for_prediction = False

    def setup_embeddings_and_output_layer(self) -> None:
        """Tie the last stage's output layer (or its word-embedding copy for multi-token prediction) to the first
        stage's word embeddings (nothing when untied or when one stage holds both, which then share one tensor)."""
        weight = self.pipeline_tied_embedding_weight()
        if weight is not None and (self.pre_process or self.post_process):
            tie_word_embeddings_across_pipeline(weight, holds_input_embedding=self.pre_process)

    def pipeline_tied_embedding_weight(self) -> Optional[torch.Tensor]:
        """The weight this end stage keeps equal to the other end stage's (gradients summed over the embedding
        group after every backward pass), or None when nothing is tied across stages."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        if self.embedding_tied_for_prediction:
            return self.embedding.word_embeddings.weight
        return None

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The tensor that serves as word embeddings and output weight on this stage."""
        if self.pre_process:
            return self.embedding.word_embeddings.weight
        return self.output_layer.weight
