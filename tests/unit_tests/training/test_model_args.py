"""Model flags -> validated args -> TransformerConfig -> model, for both stacks; FLOPs per token."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gpt_builders import gpt_builder
from megatron.core.models.gpt import GPTModel
from megatron.legacy.model import GPTModel as LegacyGPTModel
from megatron.training.arguments import ArgumentsError, parse_args, validate_args
from megatron.training.flops import num_floating_point_operations
from megatron.training.model_config import core_transformer_config_from_args

TRAINING = ["--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--device", "cpu"]
LLAMA = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--ffn-hidden-size", "96", "--position-embedding-type", "rope",
    "--rotary-base", "500000", "--use-rope-scaling", "--normalization", "RMSNorm", "--norm-epsilon", "1e-5",
    "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--max-position-embeddings", "64",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]
GPT = ["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4", "--max-position-embeddings", "64"]


def validated(*flags):
    return validate_args(parse_args(args_list=[*TRAINING, *flags]))


@pytest.mark.parametrize("flags, fused", [((), True), (("--no-fused-output-cross-entropy",), False)])
def test_fused_output_cross_entropy_is_on_unless_turned_off(flags, fused):
    assert core_transformer_config_from_args(validated(*GPT, *flags)).fused_output_cross_entropy is fused


@pytest.mark.parametrize(
    "flags, compiled, swiglu, rope",
    [((), False, True, True), (("--torch-compile-fusions",), True, True, True),
     (("--torch-compile-fusions", "--no-bias-swiglu-fusion", "--no-rope-fusion"), True, False, False)],
)
def test_torch_compile_fusions_are_off_unless_asked_for(flags, compiled, swiglu, rope):
    config = core_transformer_config_from_args(validated(*LLAMA, *flags))
    assert (config.torch_compile_fusions, config.bias_activation_fusion, config.apply_rope_fusion) == (compiled, swiglu, rope)


def test_gradient_accumulation_fusion_is_on_unless_turned_off():
    assert core_transformer_config_from_args(validated(*LLAMA)).gradient_accumulation_fusion
    assert not core_transformer_config_from_args(validated(*LLAMA, "--no-gradient-accumulation-fusion")).gradient_accumulation_fusion


def test_megatron_kernel_switches_are_accepted():
    validated(*LLAMA, "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
              "--no-persist-layer-norm", "--cross-entropy-loss-fusion")


def test_classic_gpt_comes_from_the_defaults():
    args = validated(*GPT)
    config = core_transformer_config_from_args(args)
    assert args.position_embedding_type == "learned_absolute" and not args.untie_embeddings_and_output_weights
    assert (config.normalization, config.add_bias_linear, config.gated_linear_unit) == ("LayerNorm", True, False)
    assert config.activation_func is F.gelu and config.bias_activation_fusion  # Megatron's tanh bias-GeLU
    assert (config.ffn_hidden_size, config.kv_channels, config.num_query_groups) == (192, 12, 4)
    assert (config.hidden_dropout, config.attention_dropout, config.init_method_std) == (0.1, 0.1, 0.02)
    assert args.transformer_impl == "local"


def test_llama_flags_map_onto_the_config():
    args = validated(*LLAMA, "--qk-layernorm", "--use-cpu-initialization", "--bf16")
    config = core_transformer_config_from_args(args)
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (2, 16, 96)
    assert config.gated_linear_unit and config.activation_func is F.silu and not config.add_bias_linear
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-5 and config.qk_layernorm
    assert config.use_cpu_initialization and config.bf16 and config.params_dtype == torch.bfloat16


def test_swiglu_default_width_follows_megatron():
    args = validated("--num-layers", "1", "--hidden-size", "4096", "--num-attention-heads", "32", "--swiglu",
                     "--max-position-embeddings", "8")
    assert args.ffn_hidden_size == 10880


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "6", "--group-query-attention",
          "--num-query-groups", "4"], "--num-attention-heads 6 is not divisible by --num-query-groups 4"),
        (["--num-layers", "2", "--hidden-size", "50", "--num-attention-heads", "4"],
         "--hidden-size 50 is not divisible by --num-attention-heads 4; choose sizes that divide or give the head "
         "width with --kv-channels"),
        ([*GPT, "--use-legacy-models", "--use-mcore-models"], "mutually exclusive"),
        ([*GPT, "--transformer-impl", "transformer_engine"],
         "--transformer-impl transformer_engine needs the transformer_engine package"),
        ([*GPT, "--use-rope-scaling"], "needs --position-embedding-type rope"),
        (["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4"], "need --max-position-embeddings"),
        ([*GPT, "--use-flash-attn"], "set --attention-dropout 0"),
    ],
)
def test_inconsistent_model_flags(flags, message):
    with pytest.raises(ArgumentsError) as error:
        validated(*flags)
    assert message in str(error.value)


@pytest.mark.parametrize("stack,model_class", [([], GPTModel), (["--use-legacy-models"], LegacyGPTModel)])
def test_builder_picks_the_stack(stack, model_class):
    args = validated(*LLAMA, "--use-cpu-initialization", *stack)
    args.padded_vocab_size = 128
    model = gpt_builder(args)
    assert type(model) is model_class
    ids = torch.randint(0, 128, (2, 8))
    assert model(ids, None, None).shape == (2, 8, 128)
    stage = gpt_builder(args, pre_process=False)
    assert not any("embedding" in name for name, _ in stage.named_parameters())


def test_builder_needs_the_vocabulary():
    with pytest.raises(ArgumentsError, match="build the tokenizer first"):
        gpt_builder(validated(*GPT))


def _counted_forward_flops(model, length):
    # The math kernel runs attention as matrix products torch's counter sees (the fused kernels it skips).
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 128, (1, length)), None, None)
    return counter.get_total_flops()


MOE = [
    *LLAMA, "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
    "--moe-shared-expert-intermediate-size", "16", "--moe-layer-freq", "[0,1]",
]


@pytest.mark.parametrize("flags", [GPT, LLAMA, MOE], ids=["gpt", "llama-gqa-swiglu-untied", "moe-topk-shared"])
def test_flops_per_token_count_every_matrix_multiplication(flags):
    length = 32
    args = validated(*flags, "--use-cpu-initialization")
    args.padded_vocab_size, args.seq_length = 128, length
    model = gpt_builder(args).eval()
    with torch.no_grad():
        counted = _counted_forward_flops(model, length) / length
    # torch counts the full s x s attention matrix; Megatron-LM counts the causal half.
    full_attention = 2 * 2 * args.num_attention_heads * args.kv_channels * length * args.num_layers
    expected_training = 3 * (counted - full_attention / 2)
    assert num_floating_point_operations(args, batch_size=4) == pytest.approx(4 * length * expected_training, rel=1e-9)


def test_flops_match_the_published_gpt_formula():
    # 72 B s l h^2 (1 + s / (12 h) + V / (12 l h)) for GPT with 4h MLPs, causal attention (Megatron-LM).
    args = validated("--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16",
                     "--max-position-embeddings", "2048")
    args.padded_vocab_size, args.seq_length = 50304, 2048
    batch, s, layers, h, vocab = 8, 2048, 24, 2048, 50304
    published = 72 * batch * s * layers * h * h * (1 + s / (12 * h) + vocab / (12 * layers * h))
    assert num_floating_point_operations(args, batch) == pytest.approx(published, rel=1e-12)
