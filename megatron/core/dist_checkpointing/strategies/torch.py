"""The class names Megatron-LM's `.metadata` pickles refer to, so that its torch_dist checkpoints unpickle here.

core_v0.15 pickles its metadata as `MCoreMetadata` and earlier releases may pickle `MCoreSavePlan`; both only
add fields to torch's classes, which unpickling restores from the file.
"""

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan


class MCoreMetadata(Metadata):
    """torch's checkpoint Metadata as Megatron-LM core_v0.15 pickles it."""


class MCoreSavePlan(SavePlan):
    """torch's SavePlan as Megatron-LM releases up to core_v0.14 pickle it."""
