"""The Hugging Face tables: every paired transform is an exact inverse, and a table read both ways covers
each tensor once."""

import argparse

import pytest
import torch

from tools.checkpoint.hf_families import (
    FAMILIES,
    GateUp,
    GroupedQueryKeyValue,
    PackedQueryKeyValue,
    Same,
    Transposed,
    VocabularyRows,
)

ARGS = argparse.Namespace(
    num_attention_heads=4, num_query_groups=2, kv_channels=3, padded_vocab_size=12, true_vocab_size=10
)


def _round_trip(transform, tensors):
    fused = transform.to_mcore(tensors, ARGS)
    return fused, transform.from_mcore(fused, ARGS)


@pytest.mark.parametrize(
    "transform, shapes",
    [
        (Same(), [(5, 7)]),
        (GateUp(), [(6, 5), (6, 5)]),
        (GroupedQueryKeyValue(), [(12, 5), (6, 5), (6, 5)]),
        (GroupedQueryKeyValue(), [(12,), (6,), (6,)]),
        (PackedQueryKeyValue(), [(36, 5)]),
        (Transposed(), [(5, 7)]),
        (Transposed(PackedQueryKeyValue()), [(5, 36)]),
    ],
)
def test_transforms_are_exact_inverses(transform, shapes):
    tensors = [torch.randn(shape) for shape in shapes]
    _, returned = _round_trip(transform, tensors)
    assert len(returned) == len(tensors)
    for original, back in zip(tensors, returned):
        assert torch.equal(original, back)


def test_grouped_qkv_interleaves_each_group():
    query, key, value = torch.arange(12.0), torch.arange(100.0, 106.0), torch.arange(200.0, 206.0)
    fused = GroupedQueryKeyValue().to_mcore([query, key, value], ARGS)
    # group 0: query heads 0-1 (6 values), its key head (3), its value head (3); then group 1.
    assert fused[:12].tolist() == [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202]


def test_vocabulary_rows_pad_with_the_last_row_and_crop_back():
    rows = torch.randn(10, 4)
    padded, (cropped,) = _round_trip(VocabularyRows(), [rows])
    assert padded.shape == (12, 4) and torch.equal(padded[10], rows[9]) and torch.equal(padded[11], rows[9])
    assert torch.equal(cropped, rows)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_table_names_every_tensor_once_both_ways(family):
    args = argparse.Namespace(
        num_layers=2, add_bias_linear=family == "gpt2", qk_layernorm=family == "qwen3",
        untie_embeddings_and_output_weights=family != "gpt2", q_lora_rank=None, mtp_num_layers=None,
    )
    entries = list(FAMILIES[family].table.entries(args))
    megatron_names = [megatron for megatron, _, _ in entries]
    hf_names = [name for _, names, _ in entries for name in names]
    assert len(set(megatron_names)) == len(megatron_names)
    assert len(set(hf_names)) == len(hf_names)
    attention = "linear_kv_up_proj" if family == "deepseek_v3" else "linear_qkv"
    assert f"decoder.layers.1.self_attention.{attention}.weight" in megatron_names
    assert ("decoder.layers.1.self_attention.q_layernorm.weight" in megatron_names) == (family == "qwen3")
