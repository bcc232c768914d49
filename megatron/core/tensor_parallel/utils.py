"""Small tensor-parallel helpers with Megatron-core's names: vocabulary ranges and tensor splits."""

from typing import List, Sequence

import torch

from megatron.core.utils import divide


def split_tensor_along_last_dim(
    tensor: torch.Tensor, num_partitions: int, contiguous_split_chunks: bool = False
) -> List[torch.Tensor]:
    """`num_partitions` equal slices of the last dimension (contiguous copies if asked)."""
    chunks = torch.split(tensor, divide(tensor.size(-1), num_partitions), dim=-1)
    return [chunk.contiguous() for chunk in chunks] if contiguous_split_chunks else list(chunks)


class VocabUtility:
    """[first, last) vocabulary ids held by a tensor-parallel rank: the vocabulary is split in equal runs."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int, world_size: int) -> Sequence[int]:
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> Sequence[int]:
        return VocabUtility.vocab_range_from_per_partition_vocab_size(
            divide(global_vocab_size, world_size), rank, world_size
        )
