"""Model-type enumeration under Megatron-core's name (Megatron-LM's pretrain stores it in the saved args)."""

import enum


class ModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4
