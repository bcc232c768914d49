"""YaRN rotary embeddings equal Hugging Face's DeepSeek-V3 ones bit for bit: inverse frequencies, the cos/sin
magnitude factor, the softmax scale, and the interleaved rotation of queries and keys."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb_interleave,
)

from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding, yarn_softmax_scale
from megatron.core.transformer.transformer_config import TransformerConfig

# (rotary dim, base, factor, original context, beta_fast, beta_slow, mscale, mscale_all_dim)
CASES = {
    "deepseek_v3": (64, 10000.0, 40.0, 4096, 32, 1, 1.0, 1.0),
    "deepseek_v2_lite": (64, 10000.0, 40.0, 4096, 32, 1, 0.707, 0.707),
    "concentration_ratio": (16, 100.0, 4.0, 256, 16, 2, 0.9, 0.8),
    "mscale_all_dim_zero": (16, 100.0, 4.0, 256, 32, 1, 0.5, 0.0),  # HF falls back to mscale(factor)
    "empty_ramp": (8, 10000.0, 2.0, 4, 32, 1, 1.0, 0.0),  # low == high == 0: the +0.001 guard
}


def _hf_config(dim, base, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim) -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        qk_rope_head_dim=dim,
        qk_nope_head_dim=8,
        max_position_embeddings=int(original * factor),
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=base,
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            mscale=mscale,
            mscale_all_dim=mscale_all_dim,
        ),
    )


def _ours(dim, base, factor, original, beta_fast, beta_slow, mscale, mscale_all_dim) -> YarnRotaryEmbedding:
    return YarnRotaryEmbedding(
        dim,
        rotary_base=base,
        use_cpu_initialization=True,
        scaling_factor=factor,
        original_max_position_embeddings=original,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_frequencies_and_mscale_equal_hf(case):
    hf_inv_freq, hf_attention_factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(*case), "cpu")
    rope = _ours(*case)
    assert torch.equal(rope.inv_freq, hf_inv_freq)
    assert rope.mscale == hf_attention_factor
    angles, mscale = rope(5, offset=3)
    positions = torch.arange(3, 8, dtype=torch.float32)
    assert torch.equal(angles[:, 0, 0], torch.cat([torch.outer(positions, hf_inv_freq)] * 2, dim=-1))
    assert mscale == hf_attention_factor


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_softmax_scale_equals_hf(case):
    dim, factor, mscale_all_dim = case[0], case[2], case[7]
    hf_attention = DeepseekV3Attention(_hf_config(*case), layer_idx=0)
    assert yarn_softmax_scale(8 + dim, factor, mscale_all_dim) == hf_attention.scaling


def test_softmax_scale_of_the_reference_numbers():
    assert yarn_softmax_scale(24, 40.0, 1.0) == pytest.approx(0.38249888831, abs=1e-11)
    deepseek_v3_mscale = 0.1 * math.log(40) + 1
    assert yarn_softmax_scale(192, 40.0, 1.0) == pytest.approx(deepseek_v3_mscale**2 / math.sqrt(192), rel=1e-15)
    assert yarn_softmax_scale(192, 40.0, 0.0) == 192**-0.5


def test_interleaved_rotation_equals_hf():
    """DeepSeek's interleaved pairs, rotated with YaRN's cos/sin magnitude, for queries [s, b, n, d] and the
    one shared key [s, b, 1, d]."""
    case = CASES["concentration_ratio"]
    config = _hf_config(*case)
    sequence, batch, heads, dim = 6, 2, 3, case[0]
    query = torch.randn(sequence, batch, heads, dim)
    key = torch.randn(sequence, batch, 1, dim)
    positions = torch.arange(sequence).expand(batch, -1)
    cos, sin = DeepseekV3RotaryEmbedding(config)(query, positions)
    # HF works on [b, n, s, d].
    hf_query, hf_key = apply_rotary_pos_emb_interleave(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), cos, sin)

    angles, mscale = _ours(*case)(sequence)
    assert mscale != 1.0
    transformer_config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    ours = [
        apply_rotary_pos_emb(t, angles, transformer_config, mscale=mscale, mla_rotary_interleaved=True)
        for t in (query, key)
    ]
    assert torch.equal(ours[0], hf_query.permute(2, 0, 1, 3))
    assert torch.equal(ours[1], hf_key.permute(2, 0, 1, 3))
    # Without the de-interleaving, the pairs would be (x0, x_{d/2}) ...: a different rotation.
    plain = apply_rotary_pos_emb(query, angles, transformer_config, mscale=mscale)
    assert not torch.allclose(plain, ours[0])
