"""Context-parallel attention (p2p ring, all_gather, a2a) at CP=4, 2 and 1 on 4 gloo ranks: output and dq/dk/dv
equal full-sequence causal SDPA in one process; and Megatron's load-balanced split of a batch (rank r holds
chunks r and 2CP-1-r), against megatron-core's."""

import json

import pytest
import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.transformer import context_parallel_attention as cp_attention
from megatron.core.transformer.context_parallel_attention import (
    CP_COMM_TYPES,
    context_parallel_attention,
    load_balanced_indices,
)
from megatron.training.utils import get_batch_on_this_cp_rank

SEQ, BATCH = 16, 2
# (query heads, key/value heads, q/k head dim, v head dim, softmax scale): MHA, GQA with d_v != d_qk, MQA with an
# MLA-style explicit scale.
CASES = [(4, 4, 8, 8, None), (4, 2, 8, 6, None), (4, 1, 12, 4, 0.3)]


def _full_attention_and_grads(case, seed):
    """Inputs, upstream gradient, and the single-process causal SDPA output and input gradients, [s, b, n, d]."""
    heads, groups, qk_dim, v_dim, scale = case
    generator = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(SEQ, BATCH, count, dim, generator=generator, requires_grad=True)
        for count, dim in ((heads, qk_dim), (groups, qk_dim), (groups, v_dim))
    ]
    grad_output = torch.randn(SEQ, BATCH, heads, v_dim, generator=generator)
    query, key, value = (tensor.permute(1, 2, 0, 3) for tensor in inputs)
    output = F.scaled_dot_product_attention(
        query, key.repeat_interleave(heads // groups, 1), value.repeat_interleave(heads // groups, 1),
        is_causal=True, scale=scale,
    ).permute(2, 0, 1, 3)
    output.backward(grad_output)
    return inputs, grad_output, output.detach(), [tensor.grad for tensor in inputs]


def _cp_equals_full_attention(rank):
    """On 4 ranks: CP=4, then CP=2 (x DP=2), then CP=1 (plain causal attention)."""
    torch.set_num_threads(1)  # four ranks share the test machine's cores
    cp_attention.QUERY_TILE = 3  # the ring's blocks (2 to 8 query rows) span several tiles
    _check_against_full_attention()
    for cp_size in (2, 1):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(context_parallel_size=cp_size)
        _check_against_full_attention()


def _check_against_full_attention():
    group = parallel_state.get_context_parallel_group()
    cp_rank, cp_size = parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()
    local = load_balanced_indices(SEQ, cp_rank, cp_size)
    for seed, case in enumerate(CASES):
        inputs, grad_output, expected, expected_grads = _full_attention_and_grads(case, seed)
        for comm_type in CP_COMM_TYPES:
            local_inputs = [tensor.detach()[local].requires_grad_() for tensor in inputs]
            output = context_parallel_attention(*local_inputs, group, comm_type, softmax_scale=case[4])
            output.backward(grad_output[local])
            where = f"{comm_type}, CP={cp_size}, rank {cp_rank}, case {case}"
            torch.testing.assert_close(output, expected[local], atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}: {m}")
            for name, tensor, grad in zip("qkv", local_inputs, expected_grads):
                torch.testing.assert_close(
                    tensor.grad, grad[local], atol=1e-5, rtol=1e-5, msg=lambda m: f"{where}, d{name}: {m}"
                )


def test_context_parallel_attention_equals_full_causal_sdpa(run_on_gloo):
    run_on_gloo(4, _cp_equals_full_attention, context_parallel_size=4)


@pytest.mark.parametrize(
    "comm_type, query_shape, key_shape, message",
    [
        ("ring", (4, 1, 4, 8), (4, 1, 4, 8), "unknown context-parallel comm type 'ring'"),
        ("p2p", (3, 1, 4, 8), (3, 1, 4, 8), "two equal chunks, but got 3 tokens"),
        ("all_gather", (4, 1, 4, 8), (4, 1, 3, 8), "4 query heads cannot share 3 key/value heads"),
    ],
)
def test_context_parallel_attention_refuses_bad_input(comm_type, query_shape, key_shape, message):
    with pytest.raises(ValueError, match=message):
        query, key = torch.zeros(query_shape), torch.zeros(key_shape)
        context_parallel_attention(query, key, key, None, comm_type)


def test_load_balanced_indices_hold_chunks_r_and_2cp_minus_1_minus_r():
    assert load_balanced_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert load_balanced_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert load_balanced_indices(16, 1, 4).tolist() == [2, 3, 12, 13]
    assert load_balanced_indices(16, 3, 4).tolist() == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="not divisible by 2 x context-parallel size 8"):
        load_balanced_indices(12, 0, 4)


def _batch(seq_length):
    tokens = torch.arange(2 * seq_length).view(2, seq_length)
    return {
        "tokens": tokens,
        "labels": tokens + 1000,
        "loss_mask": (tokens % 3 != 0).float(),
        "position_ids": tokens % seq_length,
        "attention_mask": torch.arange(seq_length * seq_length).view(1, 1, seq_length, seq_length) % 5 == 0,
    }


def _split_on_every_rank(cp_size, seq_length, monkeypatch):
    splits = []
    for cp_rank in range(cp_size):
        monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp_size)
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: cp_rank)
        splits.append(get_batch_on_this_cp_rank(_batch(seq_length)))
    return splits


@pytest.mark.parametrize("cp_size", [2, 4])
def test_split_batch_round_trips(cp_size, monkeypatch):
    seq_length = 16
    splits = _split_on_every_rank(cp_size, seq_length, monkeypatch)
    full = _batch(seq_length)
    for name, value in full.items():
        seq_dim = 2 if name == "attention_mask" else 1
        unsplit = torch.zeros_like(value)
        for cp_rank, split in enumerate(splits):
            unsplit.index_copy_(seq_dim, load_balanced_indices(seq_length, cp_rank, cp_size), split[name])
        assert torch.equal(unsplit, value), name


def test_split_batch_matches_the_published_megatron_core(run_reference_megatron, monkeypatch):
    """The reference's get_batch_on_this_cp_rank on the same batches, for CP=2 and 4 on every rank."""
    layouts = [(cp_size, cp_rank) for cp_size in (2, 4) for cp_rank in range(cp_size)]
    code = f"""
import json, torch
from megatron.core import parallel_state, utils
out = []
for cp_size, cp_rank in {layouts}:
    parallel_state.get_context_parallel_world_size = lambda: cp_size
    parallel_state.get_context_parallel_rank = lambda: cp_rank
    tokens = torch.arange(32).view(2, 16)
    batch = dict(tokens=tokens, labels=tokens + 1000, loss_mask=(tokens % 3 != 0).float(), position_ids=tokens % 16,
                 attention_mask=torch.arange(256).view(1, 1, 16, 16) % 5 == 0)
    out.append({{name: value.tolist() for name, value in utils.get_batch_on_this_cp_rank(batch).items()}})
print(json.dumps(out))
"""
    expected = json.loads(run_reference_megatron(code))
    ours = [split for cp_size in (2, 4) for split in _split_on_every_rank(cp_size, 16, monkeypatch)]
    assert [{name: value.tolist() for name, value in split.items()} for split in ours] == expected
