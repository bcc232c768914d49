import math

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.transformer_config import TransformerConfig

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM = 10, 2, 4, 2, 8


@pytest.fixture
def attention():
    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_query_groups=GROUPS,
        attention_dropout=0.0,
    )
    return DotProductAttention(config, layer_number=1)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The tensors and masks attention hands to torch's kernel."""
    calls, kernel = [], F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        calls.append(dict(query=query, attn_mask=attn_mask, is_causal=is_causal))
        return kernel(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def qkv():
    generator = torch.Generator().manual_seed(0)
    shapes = [(SEQ, BATCH, HEADS, HEAD_DIM), (SEQ, BATCH, GROUPS, HEAD_DIM), (SEQ, BATCH, GROUPS, HEAD_DIM)]
    return [torch.randn(*shape, generator=generator, requires_grad=True) for shape in shapes]


def reference_attention(query, key, value, masked_out):
    """softmax(Q K^T / sqrt(d) with masked_out at -inf) V, written out: [s, b, n, d] in, [s, b, n * d] out."""
    key, value = (t.repeat_interleave(HEADS // GROUPS, dim=2) for t in (key, value))
    scores = torch.einsum("sbnd,tbnd->bnst", query, key) / math.sqrt(HEAD_DIM)
    probabilities = scores.masked_fill(masked_out, float("-inf")).softmax(dim=-1)
    return torch.einsum("bnst,tbnd->sbnd", probabilities, value).flatten(2)


def future_keys(seq=SEQ):
    return torch.ones(seq, seq, dtype=torch.bool).triu(1)


def document_mask():
    """Causal within two documents (positions 0-3 and 4-9), as --reset-attention-mask builds it, per sample."""
    mask = future_keys().clone()
    mask[4:, :4] = True
    return torch.stack([mask, future_keys()])[:, None]


def outputs_and_grads(function, inputs):
    output = function(*inputs)
    grads = torch.autograd.grad(output, inputs, torch.ones_like(output))
    return output, grads


@pytest.mark.parametrize("shape", [(1, 1), (BATCH, 1)], ids=["broadcast", "per-sample"])
def test_a_plain_causal_mask_runs_as_the_kernels_causal_mask(attention, sdpa_calls, shape):
    mask = future_keys().expand(*shape, SEQ, SEQ).contiguous()
    inputs = qkv()
    output, grads = outputs_and_grads(lambda q, k, v: attention(q, k, v, attention_mask=mask), inputs)
    expected, expected_grads = outputs_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), inputs)
    assert sdpa_calls[-1]["attn_mask"] is None and sdpa_calls[-1]["is_causal"]
    torch.testing.assert_close(output, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_any_other_mask_is_applied_as_given(attention, sdpa_calls):
    mask = document_mask()
    inputs = qkv()
    output, grads = outputs_and_grads(lambda q, k, v: attention(q, k, v, attention_mask=mask), inputs)
    expected, expected_grads = outputs_and_grads(lambda q, k, v: reference_attention(q, k, v, mask), inputs)
    assert sdpa_calls[-1]["attn_mask"] is not None and not sdpa_calls[-1]["is_causal"]
    torch.testing.assert_close(output, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    causal, _ = outputs_and_grads(lambda q, k, v: attention(q, k, v, attention_mask=future_keys()[None, None]), inputs)
    assert not torch.allclose(output[4:, 0], causal[4:, 0])  # the first sample's second document differs


def test_the_cpu_kernel_gets_contiguous_heads_first_tensors(attention, sdpa_calls):
    attention(*qkv())
    query = sdpa_calls[-1]["query"]
    assert query.shape == (BATCH, HEADS, SEQ, HEAD_DIM) and query.is_contiguous()


def test_a_mask_changed_in_place_after_use_is_read_again(attention, sdpa_calls):
    mask = future_keys()[None, None].clone()
    attention(*qkv(), attention_mask=mask)
    mask.copy_(document_mask()[:1])
    attention(*qkv(), attention_mask=mask)
    assert sdpa_calls[0]["is_causal"] and not sdpa_calls[1]["is_causal"]
    assert torch.equal(~sdpa_calls[1]["attn_mask"], mask)


def test_masks_made_under_inference_mode_are_read_each_time(attention, sdpa_calls):
    with torch.inference_mode():
        inputs = [tensor.detach() for tensor in qkv()]
        for mask in (future_keys()[None, None], document_mask()):
            attention(*inputs, attention_mask=mask)
    assert sdpa_calls[0]["is_causal"] and not sdpa_calls[1]["is_causal"]
