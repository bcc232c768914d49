"""YaRN rotary embeddings (DeepSeek-V3's long-context RoPE): frequencies interpolated between the original and
the `scaling_factor`-stretched ones along a ramp over the rotary channels, and a magnitude correction ("mscale")
of cos/sin and of the attention softmax scale. Numbers follow Hugging Face's `_compute_yarn_parameters` and
DeepSeek-V3 attention exactly, so converted checkpoints give the same logits."""

import math
from typing import Optional, Tuple

import torch

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


def yarn_get_mscale(scaling_factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor 0.1 * mscale * ln(scaling_factor) + 1 (1 when the context is not stretched)."""
    if scaling_factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scaling_factor) + 1.0


def yarn_concentration_factor(scaling_factor: float, mscale: float, mscale_all_dim: float) -> float:
    """The factor on cos and sin: mscale(f, mscale) / mscale(f, mscale_all_dim), or mscale(f) when either is
    0 (HF's rule; Megatron takes the ratio always, which differs only for mscale 0, or mscale_all_dim 0 with
    mscale != 1). 1.0 for DeepSeek-V3 (mscale = mscale_all_dim = 1)."""
    if mscale and mscale_all_dim:
        return yarn_get_mscale(scaling_factor, mscale) / yarn_get_mscale(scaling_factor, mscale_all_dim)
    return yarn_get_mscale(scaling_factor)


def yarn_softmax_scale(head_dim: int, scaling_factor: float, mscale_all_dim: float) -> float:
    """The attention softmax scale YaRN implies: mscale(f, mscale_all_dim)^2 / sqrt(head_dim), computed as HF
    does (DeepSeek-V3: 1.3689^2 / sqrt(192)); plain 1 / sqrt(head_dim) when mscale_all_dim is 0."""
    scale = head_dim**-0.5
    if mscale_all_dim:
        mscale = yarn_get_mscale(scaling_factor, mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


def _correction_dim(rotations: float, dim: int, base: float, original_max_position_embeddings: int) -> float:
    """The rotary channel whose wavelength fits `rotations` times into the original context."""
    return dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inverse_frequencies(
    dim: int,
    base: float,
    scaling_factor: float,
    original_max_position_embeddings: int,
    beta_fast: float,
    beta_slow: float,
) -> torch.Tensor:
    """[dim / 2] fp32 inverse frequencies: channels rotating more than beta_fast times over the original context
    keep their frequency, those rotating fewer than beta_slow times are divided by `scaling_factor`, and a
    linear ramp blends the two in between."""
    base_frequencies = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolated = 1.0 / base_frequencies
    interpolated = 1.0 / (scaling_factor * base_frequencies)
    low = max(math.floor(_correction_dim(beta_fast, dim, base, original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001  # a one-channel ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolated_share = 1 - ramp
    return interpolated * (1 - extrapolated_share) + extrapolated * extrapolated_share


class YarnRotaryEmbedding(RotaryEmbedding):
    """RoPE with YaRN frequencies: forward(max_seq_len, offset) returns (angles [s, 1, 1, dim] fp32 in the
    rotate-half layout, mscale), where mscale multiplies cos and sin (`apply_rotary_pos_emb(..., mscale=)`)."""

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_interleaved: bool = False,
        seq_len_interpolation_factor: Optional[float] = None,
        rotary_base: float = 10000.0,
        use_cpu_initialization: bool = False,
        scaling_factor: float = 1.0,
        original_max_position_embeddings: int = 4096,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        mscale: float = 1.0,
        mscale_all_dim: float = 0.0,
    ):
        if rotary_interleaved:
            raise ValueError("YaRN rotary embeddings use the rotate-half layout; rotary_interleaved is not supported")
        super().__init__(
            kv_channels,
            rotary_percent=rotary_percent,
            seq_len_interpolation_factor=seq_len_interpolation_factor,
            rotary_base=rotary_base,
            use_cpu_initialization=use_cpu_initialization,
        )
        dim = 2 * self.inv_freq.numel()
        self.inv_freq = yarn_inverse_frequencies(
            dim, rotary_base, scaling_factor, original_max_position_embeddings, beta_fast, beta_slow
        ).to(self.inv_freq.device)
        self.mscale = yarn_concentration_factor(scaling_factor, mscale, mscale_all_dim)

    def forward(self, max_seq_len: int, offset: int = 0) -> Tuple[torch.Tensor, float]:
        return super().forward(max_seq_len, offset), self.mscale
