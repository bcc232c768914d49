"""InferenceParams: the key/value cache that lets generation feed one new position per step."""

from typing import Dict, Tuple

import torch


class InferenceParams:
    """Per-layer key/value caches of shape [max_sequence_length, max_batch_size, groups, head_dim].

    The caller runs the prompt first, then one token at a time, advancing `sequence_len_offset` by the
    number of positions each forward added.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int):
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.key_value_memory_dict: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def update_key_value(
        self, layer_number: int, key: torch.Tensor, value: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values ([s, b, ...], e.g. [s, b, groups, head_dim]) and return every cached one
        so far."""
        start = self.sequence_len_offset
        end = start + key.size(0)
        batch = key.size(1)
        if end > self.max_sequence_length or batch > self.max_batch_size:
            raise ValueError(
                f"generation needs {end} positions x {batch} sequences but the cache holds "
                f"{self.max_sequence_length} x {self.max_batch_size}"
            )
        if layer_number not in self.key_value_memory_dict:
            # Keys and values may differ in shape (MLA caches its kv latent and its rotated key part).
            self.key_value_memory_dict[layer_number] = tuple(
                torch.empty(
                    (self.max_sequence_length, self.max_batch_size) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device
                )
                for t in (key, value)
            )
        key_cache, value_cache = self.key_value_memory_dict[layer_number]
        key_cache[start:end, :batch] = key
        value_cache[start:end, :batch] = value
        return key_cache[:end, :batch], value_cache[:end, :batch]
