"""Multi-latent attention: equal to HF DeepSeek-V3 attention (outputs, input and weight gradients; q-LoRA on and
off, YaRN and plain RoPE) and decoder layer, TP=2 with and without sequence parallelism equal to one process,
cached decoding equal to full recomputation, selective recompute equal to none, bad configs in one line."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3DecoderLayer,
    DeepseekV3RotaryEmbedding,
)

from megatron.core.models.gpt.mla_module_specs import get_gpt_mla_layer_local_spec
from megatron.core.transformer.multi_latent_attention import MLA_HF_NAMES
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import ConfigError, MLATransformerConfig
from tests.unit_tests.core.transformer.mla_helpers import (
    BATCH,
    HIDDEN,
    SEQUENCE,
    TINY_MLA,
    cached_decoding,
    mla_attention,
    mla_config,
    parallel_case_config,
    run,
    tensor_parallel_worker,
)


def hf_config(config: MLATransformerConfig) -> DeepseekV3Config:
    """The HF DeepSeek-V3 config of an MLA config (the converter's field mapping, in reverse)."""
    if config.rope_type == "yarn":
        rope = dict(
            rope_type="yarn",
            factor=config.rotary_scaling_factor,
            original_max_position_embeddings=config.original_max_position_embeddings,
            beta_fast=config.beta_fast,
            beta_slow=config.beta_slow,
            mscale=config.mscale,
            mscale_all_dim=config.mscale_all_dim,
        )
    else:
        rope = dict(rope_type="default")
    return DeepseekV3Config(
        vocab_size=64,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=1,
        first_k_dense_replace=1,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_head_dim,
        qk_rope_head_dim=config.qk_pos_emb_head_dim,
        v_head_dim=config.v_head_dim,
        max_position_embeddings=1024,
        attention_dropout=0.0,
        rms_norm_eps=config.layernorm_epsilon,
        rope_parameters=dict(rope, rope_theta=config.rotary_base),
        attn_implementation="eager",
    )


def randomize(hf_module) -> None:
    """Weights well away from HF's init (norm scales around 1), so every parameter matters."""
    with torch.no_grad():
        for name, param in hf_module.named_parameters():
            param.normal_(1.0 if "layernorm" in name else 0.0, 0.3)


def causal_mask(sequence: int) -> torch.Tensor:
    """HF's additive mask [1, 1, s, s]."""
    return torch.full((sequence, sequence), float("-inf")).triu(1)[None, None]


def hf_forward(hf_module, hf, hidden_states):
    """An HF attention or decoder layer on our layout: hidden states [s, b, h] -> output [s, b, h]."""
    inputs = hidden_states.transpose(0, 1)
    positions = torch.arange(hidden_states.size(0)).expand(hidden_states.size(1), -1)
    position_embeddings = DeepseekV3RotaryEmbedding(hf)(inputs, positions)
    output = hf_module(inputs, position_embeddings=position_embeddings, attention_mask=causal_mask(inputs.size(1)))
    return (output[0] if isinstance(output, tuple) else output).transpose(0, 1)


CASES = {
    "q_lora_yarn": {},
    "no_q_lora_yarn": dict(q_lora_rank=None),
    "q_lora_plain_rope": dict(rope_type="rope"),
}


@pytest.mark.parametrize("fields", CASES.values(), ids=CASES.keys())
def test_attention_equals_hf_deepseek_v3(fields):
    torch.manual_seed(0)
    config = mla_config(**fields)
    hf = hf_config(config)
    hf_attention = DeepseekV3Attention(hf, layer_idx=0)
    randomize(hf_attention)
    attention = mla_attention(config)
    hf_state = hf_attention.state_dict()
    attention.load_state_dict({name: hf_state[MLA_HF_NAMES[name]] for name in attention.state_dict()})
    assert attention.softmax_scale == hf_attention.scaling

    hidden_states, weights = torch.randn(SEQUENCE, BATCH, HIDDEN), torch.randn(SEQUENCE, BATCH, HIDDEN)
    expected, expected_grad = run(lambda x: hf_forward(hf_attention, hf, x), hidden_states, weights)
    output, grad = run(lambda x: attention(x)[0], hidden_states, weights)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    hf_params = dict(hf_attention.named_parameters())
    for name, param in attention.named_parameters():
        torch.testing.assert_close(param.grad, hf_params[MLA_HF_NAMES[name]].grad, atol=1e-5, rtol=1e-5, msg=name)


def test_decoder_layer_with_the_mla_spec_equals_hf():
    """The spec drops MLA into a local decoder layer (SelfAttention's contract): HF's dense decoder layer."""
    torch.manual_seed(0)
    config = mla_config()
    hf = hf_config(config)
    hf_layer = DeepseekV3DecoderLayer(hf, layer_idx=0)
    randomize(hf_layer)
    layer = build_module(get_gpt_mla_layer_local_spec(qk_layernorm=True), config=config, layer_number=1)
    hf_state = hf_layer.state_dict()
    layer.load_state_dict(
        {
            "input_layernorm.weight": hf_state["input_layernorm.weight"],
            "pre_mlp_layernorm.weight": hf_state["post_attention_layernorm.weight"],
            "mlp.linear_fc1.weight": torch.cat([hf_state["mlp.gate_proj.weight"], hf_state["mlp.up_proj.weight"]]),
            "mlp.linear_fc2.weight": hf_state["mlp.down_proj.weight"],
            **{f"self_attention.{name}": hf_state[f"self_attn.{hf_name}"] for name, hf_name in MLA_HF_NAMES.items()
               if f"self_attn.{hf_name}" in hf_state},
        }
    )
    hidden_states, weights = torch.randn(SEQUENCE, BATCH, HIDDEN), torch.randn(SEQUENCE, BATCH, HIDDEN)
    expected, expected_grad = run(lambda x: hf_forward(hf_layer, hf, x), hidden_states, weights)
    output, grad = run(lambda x: layer(x)[0], hidden_states, weights)  # (hidden_states, context)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_cached_decoding_equals_full_recomputation(q_lora_rank):
    torch.manual_seed(0)
    config = mla_config(q_lora_rank=q_lora_rank, init_method_std=0.3)
    attention = mla_attention(config).eval()
    hidden_states = torch.randn(SEQUENCE, BATCH, HIDDEN)
    with torch.no_grad():
        expected = attention(hidden_states)[0]
        output, inference_params = cached_decoding(attention, hidden_states, prompt_length=3)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    # The cache holds the latents: the normed kv latent and the rotated shared key part, not per-head k and v.
    kv_latent, k_pos_emb = inference_params.key_value_memory_dict[1]
    assert kv_latent.shape == (SEQUENCE, BATCH, config.kv_lora_rank)
    assert k_pos_emb.shape == (SEQUENCE, BATCH, 1, config.qk_pos_emb_head_dim)


def test_selective_recompute_equals_no_recompute():
    hidden_states, weights = torch.randn(SEQUENCE, BATCH, HIDDEN), torch.randn(SEQUENCE, BATCH, HIDDEN)
    results = []
    for recompute in (None, "selective"):
        torch.manual_seed(1)
        attention = mla_attention(mla_config(recompute_granularity=recompute, init_method_std=0.3))
        output, grad = run(lambda x: attention(x)[0], hidden_states, weights)
        results.append((output, grad, {name: param.grad for name, param in attention.named_parameters()}))
    (expected, expected_grad, expected_grads), (output, grad, grads) = results
    assert torch.equal(output, expected) and torch.equal(grad, expected_grad)
    for name, param_grad in grads.items():
        assert torch.equal(param_grad, expected_grads[name]), name


def test_two_tensor_parallel_ranks_equal_one(run_on_gloo):
    """Heads split over TP=2 (down-projections sharded and gathered), with and without sequence parallelism,
    and cached decoding at TP=2: outputs, input gradients and each weight's gradient (its shard) as one process."""
    torch.manual_seed(0)
    hidden_states, weights = torch.randn(SEQUENCE, BATCH, HIDDEN), torch.randn(SEQUENCE, BATCH, HIDDEN)
    cases = []
    for q_lora_rank, sequence_parallel in [(16, False), (16, True), (None, True)]:
        torch.manual_seed(1)
        reference = mla_attention(parallel_case_config(q_lora_rank, sequence_parallel))
        output, grad = run(lambda x: reference(x)[0], hidden_states, weights)
        grads = {name: param.grad for name, param in reference.named_parameters()}
        with torch.no_grad():
            cached = reference.eval()(hidden_states)[0]
        cases.append(((q_lora_rank, sequence_parallel), (reference.state_dict(), output, grad, grads, cached)))
    run_on_gloo(2, tensor_parallel_worker, cases, hidden_states, weights, tensor_parallel_size=2)


BAD_CONFIGS = {
    "kv_lora_rank_missing": (dict(kv_lora_rank=None), "--kv-lora-rank"),
    "q_lora_rank_zero": (dict(q_lora_rank=0), "--q-lora-rank"),
    "odd_rope_dim": (dict(qk_pos_emb_head_dim=7), "--qk-pos-emb-head-dim 7"),
    "rope_dim_missing": (dict(qk_pos_emb_head_dim=None), "--qk-pos-emb-head-dim None"),
    "odd_rotated_share": (dict(rope_type="rope", rotary_percent=0.5, qk_pos_emb_head_dim=6), "--rotary-percent"),
    "v_head_dim_zero": (dict(v_head_dim=0), "--v-head-dim"),
    "unknown_rope_type": (dict(rope_type="ntk"), "--rope-type"),
    "grouped_query": (dict(num_query_groups=2), "--group-query-attention"),
    "interleaved_flag": (dict(rotary_interleaved=True), "--rotary-interleaved"),
    "betas_reversed": (dict(beta_fast=1, beta_slow=32), "--beta-slow"),
    "scaling_factor_zero": (dict(rotary_scaling_factor=0), "--rotary-scaling-factor"),
    "latent_not_divisible_by_tp": (dict(tensor_model_parallel_size=2, kv_lora_rank=11), "--kv-lora-rank"),
}


@pytest.mark.parametrize("fields, flag", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_configs_fail_in_one_line_naming_the_flag(fields, flag):
    with pytest.raises(ConfigError) as error:
        mla_config(**fields)
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_tiny_config_is_valid():
    """The bad-config cases each change one field of a config that builds."""
    assert mla_config().kv_lora_rank == TINY_MLA["kv_lora_rank"]
