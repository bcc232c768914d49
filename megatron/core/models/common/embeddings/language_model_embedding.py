"""Token (+ learned position) embeddings, returned sequence-first: [s, b, h] (or [s/tp, b, h] with
sequence parallelism)."""

import contextlib
from typing import Optional

import torch

from megatron.core.tensor_parallel.layers import VocabParallelEmbedding, parameter_device
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class LanguageModelEmbedding(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: str = "learned_absolute",
        num_tokentypes: int = 0,
    ):
        super().__init__(config)
        if num_tokentypes:
            raise ValueError("token-type embeddings (num_tokentypes > 0, BERT-style) are not supported")
        self.vocab_size = vocab_size
        self.max_sequence_length = max_sequence_length
        self.num_tokentypes = num_tokentypes
        self.tokentype_embeddings = None
        self.add_position_embedding = position_embedding_type == "learned_absolute"
        # Without position embeddings the vocab-parallel sum can reduce-scatter straight to the sequence shards.
        self.reduce_scatter_embeddings = config.sequence_parallel and not self.add_position_embedding
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size,
            config.hidden_size,
            init_method=config.init_method,
            config=config,
            reduce_scatter_embeddings=self.reduce_scatter_embeddings,
        )
        if self.add_position_embedding:
            self.position_embeddings = torch.nn.Embedding(
                max_sequence_length, config.hidden_size, dtype=config.params_dtype, device=parameter_device(config)
            )
            if config.perform_initialization:
                config.init_method(self.position_embeddings.weight)
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def forward(
        self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None, tokentype_ids=None
    ) -> torch.Tensor:
        """[sequence, batch, hidden] embeddings (sequence-sharded under sequence parallelism)."""
        if tokentype_ids is not None:
            raise ValueError("tokentype_ids given, but this embedding has no token-type embeddings")
        embeddings = self.word_embeddings(input_ids)
        if self.add_position_embedding:
            if position_ids is None:
                position_ids = torch.arange(input_ids.size(1), device=input_ids.device).unsqueeze(0)
            embeddings = embeddings + self.position_embeddings(position_ids)
        if not self.reduce_scatter_embeddings:
            embeddings = embeddings.transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                embeddings = scatter_to_sequence_parallel_region(embeddings)
        # Sequence shards differ per rank, so their dropout masks come from the rank-specific stream.
        with get_cuda_rng_tracker().fork() if self.config.sequence_parallel else contextlib.nullcontext():
            return self.embedding_dropout(embeddings)
