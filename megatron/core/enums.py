"""Megatron-core's enums shared across models and the training loop."""

import enum


class ModelType(enum.Enum):
    """What a model provider builds; pretrain() runs encoder_or_decoder (decoder-only GPT) models."""

    encoder_or_decoder = 1
    encoder_and_decoder = 2
    retro_encoder = 3
    retro_decoder = 4
