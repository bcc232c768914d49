"""MoE flags -> validated args -> TransformerConfig -> model: Megatron's names, MindSpeed's aliases, the
--moe-layer-freq pattern deciding which layers are MoE, and one line for each bad input."""

import pytest

from gpt_builders import gpt_builder
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import GroupedGemmMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.errors import UserError
from megatron.training.arguments import model_flag_parser, parse_args, validate_args, validate_model_args
from megatron.training.model_config import core_transformer_config_from_args

TRAINING = ["--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--device", "cpu"]
MODEL = [
    "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
    "--max-position-embeddings", "32", "--swiglu", "--disable-bias-linear", "--use-mcore-models",
    "--use-cpu-initialization",
]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16"]


def validated(*flags, world_size=1, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    return validate_args(parse_args(args_list=[*TRAINING, *MODEL, *flags]))


def test_megatron_flags_become_config_fields():
    args = validated(
        *MOE, "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-bias-update-rate", "1e-2", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
        "--moe-router-topk-scaling-factor", "2.5", "--moe-router-dtype", "fp32",
        "--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2", "1e-3",
        "--moe-z-loss-coeff", "1e-3", "--moe-token-dispatcher-type", "alltoall", "--moe-grouped-gemm",
        "--moe-shared-expert-intermediate-size", "32", "--moe-expert-capacity-factor", "1.5",
        "--moe-token-drop-policy", "position", "--moe-layer-freq", "2", "--moe-router-force-load-balancing",
        "--moe-input-jitter-eps", "0.01",
    )
    config = core_transformer_config_from_args(args)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 16)
    assert (config.moe_router_score_function, config.moe_router_enable_expert_bias) == ("sigmoid", True)
    assert (config.moe_router_num_groups, config.moe_router_group_topk, config.moe_router_topk_scaling_factor) == (2, 1, 2.5)
    assert config.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]
    assert config.moe_aux_loss_coeff == [1e-2, 1e-3] and config.moe_z_loss_coeff == 1e-3
    assert (config.moe_token_dispatcher_type, config.moe_grouped_gemm, config.moe_layer_freq) == ("alltoall", True, 2)
    assert (config.moe_shared_expert_intermediate_size, config.moe_expert_capacity_factor) == (32, 1.5)
    assert (config.moe_router_bias_update_rate, config.moe_token_drop_policy, config.moe_router_dtype) == (1e-2, "position", "fp32")
    assert config.moe_router_force_load_balancing and config.moe_input_jitter_eps == 0.01
    single = core_transformer_config_from_args(validated(*MOE, "--moe-aux-loss-coeff", "1e-2"))
    assert (single.moe_router_load_balancing_type, single.moe_aux_loss_coeff) == ("aux_loss", 1e-2)


def test_layer_freq_list_and_mindspeed_aliases():
    assert validated(*MOE, "--moe-layer-freq", "([0]*1+[1]*3)").moe_layer_freq == [0, 1, 1, 1]
    args = validated(*MOE, "--first-k-dense-replace", "1", "--n-shared-experts", "2")
    assert (args.moe_layer_freq, args.moe_shared_expert_intermediate_size) == ([0, 1, 1, 1], 32)
    assert validated(*MOE, "--first-k-dense-replace", "-1").moe_layer_freq == 1


def test_tools_reading_model_flags_expand_the_deepseek_aliases_too():
    """tools/generate.py and the converter parse model flags alone (model_flag_parser + validate_model_args)."""
    args = model_flag_parser().parse_args([*MODEL, *MOE, "--first-k-dense-replace", "1", "--n-shared-experts", "2"])
    validate_model_args(args)
    assert (args.moe_layer_freq, args.moe_shared_expert_intermediate_size) == ([0, 1, 1, 1], 32)
    validate_model_args(args)  # saved args hold both forms: validating them again changes nothing
    assert (args.moe_layer_freq, args.moe_shared_expert_intermediate_size) == ([0, 1, 1, 1], 32)
    with pytest.raises(UserError, match="makes the first 2 layers dense but --moe-layer-freq"):
        validated(*MOE, "--first-k-dense-replace", "2", "--moe-layer-freq", "[0,1,1,1]")


def test_model_has_moe_exactly_where_the_pattern_says():
    args = validated(*MOE, "--moe-layer-freq", "[0,1,0,1]", "--moe-grouped-gemm")
    args.padded_vocab_size = 64
    layers = gpt_builder(args).decoder.layers
    assert [isinstance(layer.mlp, MoELayer) for layer in layers] == [False, True, False, True]
    assert [type(layer.mlp) for layer in layers[::2]] == [MLP, MLP]
    assert isinstance(layers[1].mlp.experts, GroupedGemmMLP) and layers[3].mlp.router.layer_number == 4
    every_other = validated(*MOE, "--moe-layer-freq", "2")
    every_other.padded_vocab_size = 64
    assert [isinstance(layer.mlp, MoELayer) for layer in gpt_builder(every_other).decoder.layers] == [True, False, True, False]


@pytest.mark.parametrize(
    "flags, world_size, message",
    [
        (["--num-experts", "3", "--expert-model-parallel-size", "2"], 2, "--num-experts 3 is not divisible by --expert-model-parallel-size 2"),
        (["--num-experts", "4", "--expert-model-parallel-size", "2"], 1, "world size 1 is not divisible by --expert-tensor-parallel-size 1 x --expert-model-parallel-size 2"),
        ([*MOE, "--tensor-model-parallel-size", "2"], 2, "need --sequence-parallel"),
        ([*MOE, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "4"], 4, "must be 1 or --tensor-model-parallel-size 2"),
        ([*MOE, "--expert-tensor-parallel-size", "2"], 2, "must be 1 or --tensor-model-parallel-size 1"),
        ([*MOE, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--moe-ffn-hidden-size", "15"], 2, "--moe-ffn-hidden-size 15 is not divisible by --expert-tensor-parallel-size 2"),
        ([*MOE, "--moe-router-topk", "5"], 1, "--moe-router-topk 5 exceeds --num-experts 4"),
        ([*MOE, "--moe-router-num-groups", "2", "--moe-router-group-topk", "3"], 1, "--moe-router-group-topk 3 must lie in"),
        ([*MOE, "--moe-router-num-groups", "2"], 1, "must be given together"),
        ([*MOE, "--moe-layer-freq", "[1,1]"], 1, "--moe-layer-freq needs one 0/1 entry per layer"),
        ([*MOE, "--use-legacy-models"], 1, "--num-experts needs the mcore stack"),
        ([*MOE, "--n-shared-experts", "1", "--moe-shared-expert-intermediate-size", "8"], 1, "--n-shared-experts 1 gives"),
    ],
)
def test_bad_moe_input_is_one_line(flags, world_size, message, monkeypatch):
    flags = [flag for flag in flags if flag != "--use-mcore-models"]
    with pytest.raises(UserError) as error:
        validated(*flags, world_size=world_size, monkeypatch=monkeypatch)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_layer_freq_expression_is_refused():
    with pytest.raises(SystemExit):
        parse_args(args_list=[*TRAINING, *MODEL, *MOE, "--moe-layer-freq", "__import__('os')"])
