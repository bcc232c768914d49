"""Tiny random Hugging Face models (built from configs, saved with save_pretrained: no downloads) and
helpers to convert and load them."""

import pytest
import torch

from tools.checkpoint.convert import main as convert_main
from tools.generate import load_model

VOCAB = 96


def _save(model, path):
    model.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf_llama_dir(tmp_path_factory):
    """Llama 3.1-style: GQA, rope theta 500000 with llama3 scaling, untied embeddings, peaked logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        tie_word_embeddings=False,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
    )
    return _save(LlamaForCausalLM(config), tmp_path_factory.mktemp("hf_llama"))


@pytest.fixture(scope="session")
def hf_qwen3_dir(tmp_path_factory):
    """Qwen3: per-head q/k RMSNorm, head_dim different from hidden / heads, GQA, tied embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # non-trivial q/k norm weights, so a missed norm shows
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return _save(model, tmp_path_factory.mktemp("hf_qwen3"))


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """Classic GPT-2: LayerNorm, gelu_new, learned positions, biases, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=48,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # biases and norm parameters away from their 0 / 1 initial values
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return _save(model, tmp_path_factory.mktemp("hf_gpt2"))


def _spread_routers(model):
    """Routers with logits far apart, so the top-k choice is not decided by rounding."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2:
                param.normal_(0.0, 1.0)


@pytest.fixture(scope="session")
def hf_mixtral_dir(tmp_path_factory):
    """Mixtral: 4 experts, top-2, GQA, untied embeddings (MOE_MLA_CP.md section 6.7)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(3)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    model = MixtralForCausalLM(config)
    _spread_routers(model)
    return _save(model, tmp_path_factory.mktemp("hf_mixtral"))


@pytest.fixture(scope="session")
def hf_qwen3_moe_dir(tmp_path_factory):
    """Qwen3-MoE: 8 experts, top-2, norm_topk_prob false (Megatron's pre-softmax), the first layer dense."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(4)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[0], max_position_embeddings=64, initializer_range=0.3,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config)
    _spread_routers(model)
    return _save(model, tmp_path_factory.mktemp("hf_qwen3_moe"))


@pytest.fixture
def convert():
    """convert(*flags): run tools/checkpoint/convert.py in-process and require success."""

    def run(*flags):
        assert convert_main([str(flag) for flag in flags]) == 0

    return run


@pytest.fixture
def load_converted():
    """load_converted(checkpoint_dir): (model in eval mode, args) on the CPU, as tools/generate.py loads it."""
    return lambda checkpoint_dir, **overrides: load_model(str(checkpoint_dir), overrides, torch.device("cpu"))
