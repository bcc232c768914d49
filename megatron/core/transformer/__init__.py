"""Transformer building blocks: config, specs, attention, MLP, layer, block."""
