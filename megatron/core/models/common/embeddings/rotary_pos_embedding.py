"""Rotary position embeddings (RoPE), with partial rotation, position interpolation and the Llama 3.1
frequency scaling."""

import math
from typing import Optional

import torch

from megatron.core import parallel_state
from megatron.core.fusions.compiled import compiled
from megatron.core.tensor_parallel.layers import default_device
from megatron.core.transformer.context_parallel_attention import load_balanced_indices
from megatron.core.transformer.transformer_config import TransformerConfig


def llama3_scaled_inverse_frequencies(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1's long-context scaling: wavelengths shorter than original_context / high_freq_factor are
    kept, those longer than original_context / low_freq_factor are stretched by `factor`, and the band
    in between is interpolated smoothly between the two."""
    wavelength = 2 * math.pi / inv_freq
    short_wavelength = original_max_position_embeddings / high_freq_factor
    long_wavelength = original_max_position_embeddings / low_freq_factor
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > long_wavelength, inv_freq / factor, interpolated)
    return torch.where(wavelength < short_wavelength, inv_freq, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Rotation angles for positions 0..max_seq_len-1: forward returns [s, 1, 1, rotary_dim] in fp32.

    `kv_channels * rotary_percent` leading channels of each head rotate; the rest pass through.
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: Optional[float] = None,
        rotary_base: float = 10000,
        rope_scaling: bool = False,
        rope_scaling_factor: float = 8.0,
        rope_scaling_low_freq_factor: float = 1.0,
        rope_scaling_high_freq_factor: float = 4.0,
        rope_scaling_original_max_position_embeddings: int = 8192,
        use_cpu_initialization: bool = False,
    ):
        super().__init__()
        if not 0.0 < rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must lie in (0, 1], got {rotary_percent}")
        dim = int(kv_channels * rotary_percent)
        if dim % 2:
            raise ValueError(f"the rotary dimension kv_channels x rotary_percent = {dim} must be even")
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = seq_len_interpolation_factor
        # Computed on the CPU whatever the default device (so GPU and CPU runs agree bit for bit), then moved.
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (rotary_base**exponents)
        if rope_scaling:
            inv_freq = llama3_scaled_inverse_frequencies(
                inv_freq,
                rope_scaling_factor,
                rope_scaling_low_freq_factor,
                rope_scaling_high_freq_factor,
                rope_scaling_original_max_position_embeddings,
            )
        self.register_buffer("inv_freq", inv_freq.to(default_device(use_cpu_initialization)), persistent=False)

    def forward(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + max_seq_len, device=self.inv_freq.device, dtype=torch.float32)
        if self.seq_len_interpolation_factor is not None:
            positions = positions / self.seq_len_interpolation_factor
        freqs = torch.outer(positions, self.inv_freq)
        if self.rotary_interleaved:
            emb = torch.repeat_interleave(freqs, 2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def rotary_angles_on_this_cp_rank(freqs: torch.Tensor) -> torch.Tensor:
    """The rows of a whole-sequence table ([s, ...]) at the global positions of this context-parallel rank's
    tokens (its load-balanced chunks, in local order), so that every token rotates by its own position."""
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return freqs
    positions = load_balanced_indices(freqs.size(0), parallel_state.get_context_parallel_rank(), cp_size, freqs.device)
    return freqs.index_select(0, positions)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    t: torch.Tensor,
    freqs: torch.Tensor,
    config: TransformerConfig,
    mscale: float = 1.0,
    mla_rotary_interleaved: bool = False,
) -> torch.Tensor:
    """Rotate the leading freqs.size(-1) channels of t ([s, b, n, d]) by the angles freqs ([s, 1, 1, r]).

    `mscale` multiplies cos and sin (YaRN's magnitude correction). `mla_rotary_interleaved` reads the rotated
    channels as DeepSeek's interleaved pairs (x0, x1), (x2, x3) ...: they are de-interleaved (even channels,
    then odd) before an ordinary rotate-half rotation, so the output comes back in de-interleaved order, as in
    HF's `apply_rotary_pos_emb_interleave`."""
    rotate = compiled(_rotate) if config.torch_compile_fusions and config.apply_rope_fusion else _rotate
    return rotate(t, freqs, mscale, mla_rotary_interleaved, config.rotary_interleaved)


def _rotate(t: torch.Tensor, freqs: torch.Tensor, mscale: float, deinterleave: bool, interleaved: bool) -> torch.Tensor:
    rotary_dim = freqs.size(-1)
    t_rotary, t_pass = t[..., :rotary_dim], t[..., rotary_dim:]
    if deinterleave:
        t_rotary = torch.cat((t_rotary[..., 0::2], t_rotary[..., 1::2]), dim=-1)
    cos = (torch.cos(freqs) * mscale).to(t.dtype)
    sin = (torch.sin(freqs) * mscale).to(t.dtype)
    t_rotary = t_rotary * cos + _rotate_half(t_rotary, interleaved) * sin
    if t_pass.size(-1) == 0:  # every channel rotates (the usual case): no copy into a concatenation
        return t_rotary
    return torch.cat((t_rotary, t_pass), dim=-1)
