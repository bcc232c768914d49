"""Megatron's distributed (`torch_dist`) checkpoints: global tensors written as blocks by every rank and read
back at any parallel layout (see serialization.py)."""

import importlib

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

# serialization.py imports torch.distributed.checkpoint (about a second): only when a checkpoint is touched.
_SERIALIZATION = (
    "AsyncSaveRequest",
    "CheckpointingException",
    "check_is_distributed_checkpoint",
    "check_storage_files",
    "load",
    "load_common_state_dict",
    "load_entries",
    "read_checkpoint_metadata",
    "save",
)

__all__ = ["ShardedObject", "ShardedTensor", *_SERIALIZATION]


def __getattr__(name):
    if name in _SERIALIZATION:
        return getattr(importlib.import_module("megatron.core.dist_checkpointing.serialization"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
