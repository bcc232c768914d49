"""Enumerations naming attention masks and attention kernels (Megatron-core names)."""

import enum


class AttnMaskType(enum.Enum):
    padding = 1
    causal = 2
    no_mask = 3
    padding_causal = 4
    arbitrary = 5


class AttnBackend(enum.Enum):
    """Which scaled-dot-product kernel attention may use; `auto` lets torch pick the fastest that fits."""

    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5
