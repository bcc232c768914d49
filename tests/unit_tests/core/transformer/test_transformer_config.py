"""TransformerConfig validates its own fields; the pipeline split gives every stage whole layers."""

import pytest
import torch.nn.functional as F

from megatron.core.model_parallel_config import ConfigError
from megatron.core.transformer.pipeline_layout import layer_offset_and_count, pipeline_stage_layer_counts
from megatron.core.transformer.transformer_config import TransformerConfig

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=8)


def test_derived_defaults():
    config = TransformerConfig(**BASE)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (8, 8, 256)
    assert config.init_method is not None and config.output_layer_init_method is not None
    assert config.pipeline_dtype == config.params_dtype


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(num_query_groups=3), "--num-attention-heads 8 is not divisible by --num-query-groups 3"),
        (dict(hidden_size=60), "--hidden-size 60 is not divisible by --num-attention-heads 8; choose sizes that divide"),
        (dict(num_layers=0), "--num-layers is required and must be positive"),
        (dict(normalization="BatchNorm"), "--normalization 'BatchNorm' is not supported"),
        (dict(hidden_dropout=1.5), "--hidden-dropout must lie in [0, 1)"),
        (dict(num_query_groups=2, tensor_model_parallel_size=4), "query groups (2) must both be divisible"),
        (dict(sequence_parallel=True), "sequence_parallel"),
        (dict(fp16=True, bf16=True), "mutually exclusive"),
        (dict(pipeline_model_parallel_size=3), "num_layers 4 is not divisible by the pipeline-parallel size 3"),
        (dict(recompute_granularity="full"), "--recompute-method uniform|block"),
        (dict(bias_activation_fusion=True, add_bias_linear=False), "needs add_bias_linear"),
    ],
)
def test_invalid_fields_raise_one_clear_message(fields, message):
    with pytest.raises(ConfigError) as error:
        TransformerConfig(**{**BASE, **fields})
    assert message in str(error.value)


def test_kv_channels_allows_any_head_width():
    config = TransformerConfig(num_layers=1, hidden_size=60, num_attention_heads=8, kv_channels=16)
    assert config.kv_channels == 16


def test_gated_units_keep_the_activation():
    config = TransformerConfig(**BASE, gated_linear_unit=True, activation_func=F.silu)
    assert config.activation_func is F.silu


def test_even_and_uneven_pipeline_splits():
    assert pipeline_stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert pipeline_stage_layer_counts(10, 4, first_stage_layers=1, last_stage_layers=3) == [1, 3, 3, 3]
    assert pipeline_stage_layer_counts(7, 2, first_stage_layers=3) == [3, 4]
    with pytest.raises(ConfigError, match="must split evenly"):
        pipeline_stage_layer_counts(10, 4, first_stage_layers=2)
    with pytest.raises(ConfigError, match="do not add up"):
        pipeline_stage_layer_counts(4, 2, first_stage_layers=3, last_stage_layers=3)


def test_virtual_stages_take_layers_round_robin():
    # 8 layers, 2 stages, 2 chunks each: stage 0 holds layers 0-1 and 4-5, stage 1 holds 2-3 and 6-7.
    assert [layer_offset_and_count(8, 2, rank, 2, chunk) for rank in (0, 1) for chunk in (0, 1)] == [
        (0, 2), (4, 2), (2, 2), (6, 2)
    ]
    with pytest.raises(ConfigError, match="not divisible by 3 virtual stages"):
        layer_offset_and_count(8, 2, 0, 3, 0)
