"""DeepSeek-V3 flags -> validated args -> MLATransformerConfig -> a DeepSeek-style GPT model (MLA, MoE after a
dense first layer, shared expert, multi-token prediction): Megatron's names, MLA's own YaRN table in place of
GPTModel's, one line for each bad combination."""

import pytest
import torch

from gpt_builders import gpt_builder
from megatron.core.errors import UserError
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import MLATransformerConfig
from megatron.training.model_config import core_transformer_config_from_args
from tests.unit_tests.training.test_moe_args import MOE, validated

MLA = [
    "--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "12", "--qk-head-dim", "8",
    "--qk-pos-emb-head-dim", "4", "--v-head-dim", "6", "--qk-layernorm", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm",
]
YARN = [
    "--rotary-scaling-factor", "40", "--mscale", "0.9", "--mscale-all-dim", "0.8",
    "--original-max-position-embeddings", "64", "--beta-fast", "16", "--beta-slow", "2",
]


def test_flags_become_an_mla_config():
    config = core_transformer_config_from_args(validated(*MLA, *YARN))
    assert isinstance(config, MLATransformerConfig) and config.multi_latent_attention
    shape = (config.q_lora_rank, config.kv_lora_rank, config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim)
    assert shape == (16, 12, 8, 4, 6)
    assert config.rope_type == "yarn"  # MLA's default when --rope-type is not given
    yarn = (config.rotary_scaling_factor, config.mscale, config.mscale_all_dim)
    assert yarn == (40.0, 0.9, 0.8)
    assert (config.original_max_position_embeddings, config.beta_fast, config.beta_slow) == (64, 16.0, 2.0)
    plain = core_transformer_config_from_args(validated(*MLA, "--rope-type", "rope"))
    assert plain.rope_type == "rope" and plain.q_lora_rank == 16
    assert type(core_transformer_config_from_args(validated())) is not MLATransformerConfig


def test_deepseek_style_model_from_flags():
    args = validated(*MLA, *YARN, *MOE, "--first-k-dense-replace", "1", "--n-shared-experts", "1",
                     "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                     "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.3")
    args.padded_vocab_size = 64
    model = gpt_builder(args)
    assert not hasattr(model, "rotary_pos_emb")  # MLA rotates with its own table
    layers = model.decoder.layers
    assert all(isinstance(layer.self_attention, MLASelfAttention) for layer in layers)
    attention = layers[0].self_attention
    assert isinstance(attention.rotary_pos_emb, YarnRotaryEmbedding)
    assert attention.linear_q_down_proj.weight.shape == (16, 32) and attention.q_layernorm is not None
    assert attention.linear_kv_up_proj.weight.shape == (4 * (8 + 6), 12)
    assert [isinstance(layer.mlp, MoELayer) for layer in layers] == [False, True, True, True]
    assert type(layers[0].mlp) is MLP and layers[1].mlp.shared_experts is not None
    assert len(model.mtp.layers) == 1 and model.config.mtp_loss_scaling_factor == 0.3
    prediction_layer = model.mtp.layers[0].transformer_layer
    assert isinstance(prediction_layer.self_attention, MLASelfAttention) and isinstance(prediction_layer.mlp, MoELayer)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rope-type", "yarn"], "--rope-type sets multi-latent attention's RoPE"),
        ([*MLA, "--group-query-attention", "--num-query-groups", "2"], "mutually exclusive"),
        ([*MLA, "--kv-lora-rank", "0"], "multi-latent attention needs --kv-lora-rank"),
        ([*MLA, "--qk-pos-emb-head-dim", "5"], "--qk-pos-emb-head-dim 5"),
        ([*MLA, "--rotary-interleaved"], "--rotary-interleaved does not apply to multi-latent attention"),
        ([*MLA, "--v-head-dim", "0"], "--v-head-dim must be positive"),
        (["--mtp-num-layers", "0"], "--mtp-num-layers must be at least 1"),
        (["--mtp-num-layers", "1", "--pipeline-model-parallel-size", "2"],
         "--mtp-num-layers does not run with --pipeline-model-parallel-size > 1 without --untie-embeddings"),
        (["--mtp-num-layers", "1", "--calculate-per-token-loss"], "--mtp-num-layers does not run with --calculate-per-token-loss"),
    ],
)
def test_bad_deepseek_input_is_one_line(flags, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as error:
        validated(*flags)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_legacy_stack_is_refused():
    from megatron.training.arguments import parse_args, validate_args
    from tests.unit_tests.training.test_moe_args import MODEL, TRAINING

    model = [flag for flag in MODEL if flag != "--use-mcore-models"]
    with pytest.raises(UserError, match="--multi-latent-attention needs the mcore stack"):
        validate_args(parse_args(args_list=[*TRAINING, *model, *MLA, "--use-legacy-models"]))


def test_flops_count_multi_latent_attention_and_prediction_depths():
    """The training log's FLOPs equal torch's count of a forward with labels (prediction depths run), the
    causal half of the attention matrices taken as Megatron does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron.training.flops import num_floating_point_operations

    length, heads = 16, 4
    args = validated(*MLA, *YARN, *MOE, "--first-k-dense-replace", "1", "--mtp-num-layers", "1",
                     "--attention-dropout", "0", "--hidden-dropout", "0")
    args.padded_vocab_size, args.seq_length = 64, length
    model = gpt_builder(args).train()
    tokens = torch.randint(0, 64, (1, length))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(tokens, torch.arange(length)[None], None, labels=tokens)
    counted = counter.get_total_flops() / length
    attention_layers = args.num_layers + args.mtp_num_layers
    full_attention = 2 * heads * ((8 + 4) + 6) * length * attention_layers  # QK^T over 8 + 4 channels, PV over 6
    expected_training = 3 * (counted - full_attention / 2)
    assert num_floating_point_operations(args, batch_size=2) == pytest.approx(2 * length * expected_training, rel=1e-9)
