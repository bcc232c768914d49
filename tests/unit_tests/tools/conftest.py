"""Tiny random Hugging Face models (built from configs, saved with save_pretrained: no downloads) and
helpers to convert and load them."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
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


def assert_logits_match_transformers(model, hf_dir):
    """Our logits of random tokens within 1e-4 of the scale of transformers' (which must be peaked)."""
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
        reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
    scale = reference.abs().max()
    assert scale > 1.0
    assert (ours - reference).abs().max() <= 1e-4 * scale


def assert_training_loss_matches_transformers(model, hf_dir):
    """In training mode (MoE aux losses attached, not added to the LM loss) our loss is transformers'; the
    model keeps its gradients for the caller to check."""
    from transformers import AutoModelForCausalLM

    model.train()
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    loss = model(inputs, torch.arange(inputs.size(1)).expand_as(inputs), None, labels=labels).mean()
    loss.backward()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens, labels=tokens).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def assert_gradients_match_transformers(model, hf_dir, pairs):
    """The LM loss's gradients equal transformers' for `pairs` of (our parameter, transformers' parameter, index
    into it or None); the MoE aux losses are switched off, as transformers adds none without
    output_router_logits."""
    from transformers import AutoModelForCausalLM

    model.train()
    types = model.config.moe_router_load_balancing_type
    model.config.moe_aux_loss_coeff = 0.0 if isinstance(types, str) else [0.0] * len(types)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model(inputs, torch.arange(inputs.size(1)).expand_as(inputs), None, labels=labels).mean().backward()
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    reference(tokens, labels=tokens).loss.backward()
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    experts_with_tokens = 0
    for our_name, their_name, index in pairs:
        expected = theirs[their_name].grad if index is None else theirs[their_name].grad[index]
        scale = expected.abs().max()
        assert scale > 0 or index is not None, their_name  # a routed expert (indexed) may receive no token
        experts_with_tokens += int(index is not None and scale > 0)
        torch.testing.assert_close(ours[our_name].grad, expected, rtol=1e-4, atol=1e-4 * scale, msg=our_name)
    assert experts_with_tokens > 0 or all(index is None for _, _, index in pairs)


def assert_same_safetensors(original_dir, returned_dir):
    """Both directories' model.safetensors hold the same names with bit-identical tensors."""
    original, returned = load_file(f"{original_dir}/model.safetensors"), load_file(f"{returned_dir}/model.safetensors")
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor, returned[key]), key


def assert_generate_matches_transformers(hf_dir, checkpoint_dir, prompt=(5, 17, 42, 7), new_tokens=6):
    """tools/generate.py on the converted checkpoint gives transformers' greedy ids."""
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(hf_dir).eval().generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False
    )[0].tolist()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "generate.py"), "--load", str(checkpoint_dir),
         "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new_tokens), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    generated = next(line for line in result.stdout.splitlines() if line.startswith("generated ids: "))
    assert [int(token) for token in generated.split()[2:]] == expected[len(prompt):]


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


def deepseek_v3_config(**fields):
    """DeepSeek-V3 in miniature (MOE_MLA_CP.md section 6.7): q-LoRA, YaRN, 8 experts in 4 groups (top-4 of
    the best 2 groups), a shared expert, the first layer dense."""
    from transformers import DeepseekV3Config

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    settings = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=4, n_shared_experts=1,
        routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=256, rope_parameters=rope, initializer_range=0.3, tie_word_embeddings=False,
    )
    return DeepseekV3Config(**{**settings, **fields})


def _deepseek_v3_dir(tmp_path_factory, name, seed, **fields):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(deepseek_v3_config(**fields))
    _spread_routers(model)
    with torch.no_grad():  # an expert bias and latent norms away from their initial values, so a missed one shows
        for name_, tensor in model.state_dict().items():
            if name_.endswith("e_score_correction_bias"):
                tensor.normal_(0.0, 0.5)
            elif "a_layernorm" in name_:
                tensor.uniform_(0.5, 1.5)
    return _save(model, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def hf_deepseek_v3_dir(tmp_path_factory):
    return _deepseek_v3_dir(tmp_path_factory, "hf_deepseek_v3", 5)


@pytest.fixture(scope="session")
def hf_deepseek_v3_plain_dir(tmp_path_factory):
    """Without q-LoRA (q_proj), plain RoPE, one expert group, tied embeddings."""
    return _deepseek_v3_dir(
        tmp_path_factory, "hf_deepseek_v3_plain", 6, q_lora_rank=None, n_group=1, topk_group=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
    )
