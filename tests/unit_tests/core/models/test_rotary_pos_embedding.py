"""Rotate-half rotary embeddings equal Hugging Face's (GPT-NeoX's, which also rotates only part of each head)
bit for bit, with every channel rotated and with the trailing channels passed through (--rotary-percent)."""

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding, apply_rotary_pos_emb
from megatron.core.transformer.transformer_config import TransformerConfig


@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_rotation_equals_hf(rotary_percent):
    sequence, batch, heads, head_dim = 5, 2, 3, 16
    query = torch.randn(sequence, batch, heads, head_dim, requires_grad=True)
    key = torch.randn(sequence, batch, 1, head_dim)
    angles = RotaryEmbedding(head_dim, rotary_percent, use_cpu_initialization=True)(sequence)  # [s, 1, 1, r]
    assert angles.size(-1) == int(head_dim * rotary_percent)
    config = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads)

    ours = [apply_rotary_pos_emb(t, angles, config) for t in (query, key)]

    # HF works on [b, n, s, d] with cos / sin [b, s, r].
    cos, sin = angles.cos()[:, 0, 0].unsqueeze(0), angles.sin()[:, 0, 0].unsqueeze(0)
    hf_query, hf_key = hf_apply_rotary_pos_emb(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), cos, sin)
    assert torch.equal(ours[0], hf_query.permute(2, 0, 1, 3))
    assert torch.equal(ours[1], hf_key.permute(2, 0, 1, 3))
    assert ours[0].data_ptr() != query.data_ptr()

    # The gradient: a rotation's transpose on the rotated channels, the identity on the others.
    grad = torch.randn_like(ours[0])
    (ours_grad,) = torch.autograd.grad(ours[0], query, grad)
    (hf_grad,) = torch.autograd.grad(hf_query.permute(2, 0, 1, 3), query, grad)
    torch.testing.assert_close(ours_grad, hf_grad, rtol=0, atol=1e-6)
    rotary_dim = angles.size(-1)
    assert torch.equal(ours_grad[..., rotary_dim:], grad[..., rotary_dim:])
