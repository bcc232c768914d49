"""TransformerConfig's MoE fields: Megatron's defaults, and one line naming the flag for each bad combination."""

import pytest

from megatron.core.model_parallel_config import ConfigError
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_config import TransformerConfig
from tests.unit_tests.core.transformer.moe.conftest import moe_config, moe_layer

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=8)


def test_moe_defaults():
    dense = TransformerConfig(**BASE)
    assert dense.num_moe_experts is None and dense.expert_tensor_parallel_size == 1
    config = TransformerConfig(**BASE, num_moe_experts=8)
    assert config.moe_ffn_hidden_size == config.ffn_hidden_size == 256
    assert (config.moe_router_topk, config.moe_router_score_function, config.moe_token_dispatcher_type) == (
        2, "softmax", "allgather"
    )
    assert (config.moe_router_load_balancing_type, config.moe_aux_loss_coeff, config.moe_layer_freq) == (
        "aux_loss", 0.0, 1
    )


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(expert_model_parallel_size=2), "--expert-model-parallel-size 2 needs --num-experts"),
        (dict(num_moe_experts=6, expert_model_parallel_size=4),
         "--num-experts 6 is not divisible by --expert-model-parallel-size 4"),
        (dict(num_moe_experts=8, moe_router_topk=9), "--moe-router-topk 9 exceeds --num-experts 8"),
        (dict(num_moe_experts=8, moe_router_num_groups=3, moe_router_group_topk=1),
         "--num-experts 8 is not divisible by --moe-router-num-groups 3"),
        (dict(num_moe_experts=8, moe_router_num_groups=4), "must be given together"),
        (dict(num_moe_experts=8, moe_router_num_groups=4, moe_router_group_topk=5),
         "--moe-router-group-topk 5 must lie in [1, --moe-router-num-groups 4]"),
        (dict(num_moe_experts=8, moe_router_topk=3, moe_router_num_groups=4, moe_router_group_topk=2),
         "--moe-router-topk 3 must be a multiple of --moe-router-group-topk 2"),
        (dict(num_moe_experts=8, moe_router_topk=8, moe_router_num_groups=4, moe_router_group_topk=2),
         "at most 2 experts"),
        (dict(num_moe_experts=8, moe_layer_freq=[1, 0, 1]),
         "--moe-layer-freq needs one 0/1 entry per layer (--num-layers 4), got [1, 0, 1]"),
        (dict(num_moe_experts=8, moe_layer_freq=0), "--moe-layer-freq must be at least 1"),
        (dict(num_moe_experts=8, moe_router_enable_expert_bias=True), "needs --moe-router-score-function sigmoid"),
        (dict(num_moe_experts=8, moe_router_score_function="tanh"), "--moe-router-score-function tanh: choose one"),
        (dict(num_moe_experts=8, moe_router_dtype="fp16"), "--moe-router-dtype fp16: choose one of fp32, fp64"),
        (dict(num_moe_experts=8, moe_router_load_balancing_type="sinkhorn"),
         "--moe-router-load-balancing-type sinkhorn: choose one of"),
        (dict(num_moe_experts=8, moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=0.1),
         "--moe-aux-loss-coeff needs one value per --moe-router-load-balancing-type (2)"),
        (dict(num_moe_experts=8, moe_token_dispatcher_type="flex"), "--moe-token-dispatcher-type flex: choose one"),
        (dict(num_moe_experts=8, moe_pad_expert_input_to_capacity=True),
         "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
        (dict(num_moe_experts=8, moe_expert_capacity_factor=0.0), "--moe-expert-capacity-factor must be positive"),
        (dict(num_moe_experts=8, moe_token_drop_policy="random"), "--moe-token-drop-policy random: choose one"),
        (dict(num_moe_experts=8, moe_shared_expert_gate=True),
         "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size"),
        (dict(num_moe_experts=8, moe_ffn_hidden_size=0), "--moe-ffn-hidden-size must be positive"),
        (dict(num_moe_experts=8, moe_input_jitter_eps=1.5), "--moe-input-jitter-eps must lie in (0, 1), got 1.5"),
        (dict(num_moe_experts=8, expert_tensor_parallel_size=2), "splits experts without biases: add --disable-bias-linear"),
        (dict(num_moe_experts=8, expert_tensor_parallel_size=3, add_bias_linear=False, moe_ffn_hidden_size=8),
         "--moe-ffn-hidden-size 8 is not divisible by --expert-tensor-parallel-size 3"),
    ],
)
def test_bad_moe_fields_raise_one_line(fields, message):
    with pytest.raises(ConfigError) as error:
        TransformerConfig(**{**BASE, **fields})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_list_forms_are_accepted():
    config = TransformerConfig(
        **BASE, num_moe_experts=8, moe_layer_freq=[0, 1, 1, 1],
        moe_router_load_balancing_type=["seq_aux_loss", "aux_loss"], moe_aux_loss_coeff=[1e-4, 1e-2],
    )
    assert config.moe_layer_freq == [0, 1, 1, 1]


def test_layer_refuses_a_group_that_does_not_match_the_flags():
    with pytest.raises(ConfigError, match="group size 1 differs from --expert-model-parallel-size 2"):
        moe_layer(moe_config(expert_model_parallel_size=2))
    with pytest.raises(ConfigError, match="need --sequence-parallel"):
        moe_config(tensor_model_parallel_size=2)
