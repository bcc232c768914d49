"""A tiny MLA block and its drivers, and the TP=2 worker; kept free of transformers so that the gloo ranks
start without importing it."""

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.inference_params import InferenceParams
from megatron.core.models.gpt.mla_module_specs import get_mla_self_attention_local_spec
from megatron.core.tensor_parallel.state_dict_sharding import shard_of, split_rule, split_rules, split_state_dict
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import MLATransformerConfig

SEQUENCE, BATCH, HIDDEN = 6, 2, 32
# A DeepSeek-V3-shaped block in miniature (HF field names in comments), with a YaRN ramp over several channels.
TINY_MLA = dict(
    num_layers=1,
    hidden_size=HIDDEN,
    ffn_hidden_size=24,
    num_attention_heads=4,
    q_lora_rank=16,
    kv_lora_rank=12,
    qk_head_dim=8,  # qk_nope_head_dim
    qk_pos_emb_head_dim=8,  # qk_rope_head_dim
    v_head_dim=6,
    rope_type="yarn",
    rotary_base=100.0,  # rope_theta
    rotary_scaling_factor=4.0,  # factor
    original_max_position_embeddings=256,
    beta_fast=16,
    beta_slow=2,
    mscale=0.9,
    mscale_all_dim=0.8,
    layernorm_epsilon=1e-6,  # HF's latent norms always use 1e-6
    qk_layernorm=True,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    use_cpu_initialization=True,
)


def mla_config(**fields) -> MLATransformerConfig:
    return MLATransformerConfig(**{**TINY_MLA, **fields})


def mla_attention(config: MLATransformerConfig):
    return build_module(get_mla_self_attention_local_spec(qk_layernorm=True), config=config, layer_number=1)


def run(module_forward, hidden_states, weights):
    """(output, input gradient) of sum(output * weights)."""
    hidden_states = hidden_states.clone().requires_grad_()
    output = module_forward(hidden_states)
    (output * weights).sum().backward()
    return output.detach(), hidden_states.grad


def cached_decoding(attention, hidden_states, prompt_length: int):
    """Outputs of the prompt in one forward, then of one position per forward through the cache."""
    inference_params = InferenceParams(max_batch_size=hidden_states.size(1), max_sequence_length=hidden_states.size(0))
    outputs = []
    for start, stop in [(0, prompt_length)] + [(i, i + 1) for i in range(prompt_length, hidden_states.size(0))]:
        outputs.append(attention(hidden_states[start:stop], inference_params=inference_params)[0])
        inference_params.sequence_len_offset = stop
    return torch.cat(outputs), inference_params


def parallel_case_config(q_lora_rank, sequence_parallel: bool, tensor_parallel_size: int = 1):
    return mla_config(
        q_lora_rank=q_lora_rank,
        init_method_std=0.3,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
    )


def tensor_parallel_worker(rank, cases, hidden_states, weights):
    """Each case at TP=2 against the one-process (output, input grad, weight grads, cached decoding output)."""
    group = parallel_state.get_tensor_model_parallel_group()
    for (q_lora_rank, sequence_parallel), (state, expected, expected_grad, expected_grads, expected_cached) in cases:
        scenario = f"q_lora_rank={q_lora_rank} sequence_parallel={sequence_parallel} rank {rank}"
        attention = mla_attention(parallel_case_config(q_lora_rank, sequence_parallel, tensor_parallel_size=2))
        attention.load_state_dict(split_state_dict(state, 2, split_rules(attention))[rank])
        inputs, output_weights = hidden_states, weights
        if sequence_parallel:
            local = slice(rank * SEQUENCE // 2, (rank + 1) * SEQUENCE // 2)
            inputs, output_weights = hidden_states[local], weights[local]
            expected, expected_grad = expected[local], expected_grad[local]
        output, grad = run(lambda x: attention(x)[0], inputs, output_weights)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5, msg=scenario)
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5, msg=scenario)
        for name, param in attention.named_parameters():
            dim, stride = split_rule(param)
            full_grad = expected_grads[name]
            expected_param_grad = full_grad if dim < 0 else shard_of(full_grad, rank, 2, dim, stride)
            if sequence_parallel and getattr(param, "sequence_parallel", False):
                torch.distributed.all_reduce(param.grad, group=group)  # as finalize_model_grads does
            torch.testing.assert_close(param.grad, expected_param_grad, atol=1e-5, rtol=1e-5, msg=f"{scenario} {name}")
        if not sequence_parallel:
            with torch.no_grad():
                cached, _ = cached_decoding(attention.eval(), hidden_states, prompt_length=4)
            torch.testing.assert_close(cached, expected_cached, atol=1e-5, rtol=1e-5, msg=scenario)
