"""Megatron's distributed (`torch_dist`) checkpoints: global tensors written as blocks by every rank and read
back at any parallel layout (see serialization.py)."""

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.serialization import (
    AsyncSaveRequest,
    CheckpointingException,
    check_is_distributed_checkpoint,
    load,
    load_common_state_dict,
    read_checkpoint_metadata,
    save,
)

__all__ = [
    "AsyncSaveRequest",
    "CheckpointingException",
    "ShardedObject",
    "ShardedTensor",
    "check_is_distributed_checkpoint",
    "load",
    "load_common_state_dict",
    "read_checkpoint_metadata",
    "save",
]
