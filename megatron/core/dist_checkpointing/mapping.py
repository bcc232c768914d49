"""What a rank contributes to a distributed checkpoint: pieces of global tensors and small objects.

A ShardedTensor says "this local tensor is the block of global tensor `key` (of `global_shape`) starting at
`global_offset`". The checkpoint stores global tensors, so any layout can read back the blocks it needs.
`prepend_axis_num` leading axes exist only globally (Megatron's stacked layers and experts: the local tensor
is one entry along them). A ShardedObject is a picklable value stored once per position in a grid of ranks.
Names and meanings follow Megatron-LM's `megatron.core.dist_checkpointing.mapping`.
"""

from dataclasses import dataclass, field
from typing import Any, Tuple

import torch


@dataclass
class ShardedTensor:
    key: str
    data: torch.Tensor
    global_shape: Tuple[int, ...]
    global_offset: Tuple[int, ...]
    prepend_axis_num: int = 0
    replica_id: Any = 0
    allow_shape_mismatch: bool = False
    """The first axis may differ in the checkpoint (padded vocabularies): the overlap is read."""

    def __post_init__(self):
        self.global_shape = tuple(int(size) for size in self.global_shape)
        self.global_offset = tuple(int(offset) for offset in self.global_offset)
        if len(self.global_shape) != len(self.global_offset) or len(self.global_shape) != self.prepend_axis_num + self.data.dim():
            raise ValueError(
                f"sharded tensor {self.key}: global shape {self.global_shape}, offset {self.global_offset} and "
                f"local shape {tuple(self.data.shape)} (+{self.prepend_axis_num} prepended axes) disagree"
            )

    @property
    def local_shape(self) -> Tuple[int, ...]:
        return (1,) * self.prepend_axis_num + tuple(self.data.shape)

    def local_view(self) -> torch.Tensor:
        """The local data with the prepended axes as size-1 dimensions (a view, so reads fill `data`)."""
        return self.data.view(self.local_shape) if self.data.is_contiguous() else self.data.reshape(self.local_shape)

    @classmethod
    def from_rank_offsets(cls, key: str, data: torch.Tensor, *rank_offsets, replica_id=0, prepend_axis_num: int = 0, **kwargs):
        """Megatron's constructor: each (axis, rank, parts) says the data is part `rank` of `parts` equal
        pieces along `axis` (axes count the prepended ones first)."""
        shape = [1] * prepend_axis_num + list(data.shape)
        offset = [0] * len(shape)
        for axis, rank, parts in rank_offsets:
            offset[axis] = rank * shape[axis]
            shape[axis] *= parts
        return cls(key, data, tuple(shape), tuple(offset), prepend_axis_num, replica_id, **kwargs)


@dataclass
class ShardedObject:
    key: str
    data: Any
    global_shape: Tuple[int, ...] = (1,)
    global_offset: Tuple[int, ...] = (0,)
    replica_id: Any = field(default=0)

    @property
    def unique_key(self) -> str:
        """The checkpoint's name for this object: "{key}/shard_{offsets}_{shape}", dot-joined."""
        offsets = ".".join(str(offset) for offset in self.global_offset)
        shape = ".".join(str(size) for size in self.global_shape)
        return f"{self.key}/shard_{offsets}_{shape}"
