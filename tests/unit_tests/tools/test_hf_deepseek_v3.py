"""DeepSeek-V3 through the converter (--model-type-hf deepseek_v3): transformers' logits, training loss and
gradients (q-LoRA with YaRN and expert groups; no q-LoRA with plain RoPE and tied embeddings), bit-identical
round trips (also through TP=2 x EP=2), and one line for each config Megatron cannot reproduce."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron.training.checkpointing import get_checkpoint_name
from tests.unit_tests.tools.conftest import (
    assert_generate_matches_transformers,
    assert_gradients_match_transformers,
    assert_logits_match_transformers,
    assert_same_safetensors,
    assert_training_loss_matches_transformers,
)
from tools.checkpoint.convert import main as convert_main

VARIANTS = ("hf_deepseek_v3_dir", "hf_deepseek_v3_plain_dir")


@pytest.fixture(params=VARIANTS)
def hf_dir(request):
    return request.getfixturevalue(request.param)


def _to_megatron(convert, hf_dir, save_dir, *extra):
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "deepseek_v3",
            "--load-dir", hf_dir, "--save-dir", save_dir, *extra)


def test_logits_match_transformers(hf_dir, convert, load_converted, tmp_path):
    _to_megatron(convert, hf_dir, tmp_path / "mg")
    model, args = load_converted(tmp_path / "mg")
    assert args.multi_latent_attention and args.num_experts == 8
    assert_logits_match_transformers(model, hf_dir)


def test_training_loss_matches_transformers(hf_deepseek_v3_dir, convert, load_converted, tmp_path):
    _to_megatron(convert, hf_deepseek_v3_dir, tmp_path / "mg")
    model, _ = load_converted(tmp_path / "mg")
    assert_training_loss_matches_transformers(model, hf_deepseek_v3_dir)
    attention = model.decoder.layers[1].self_attention
    assert attention.kv_layernorm.weight.grad.abs().sum() > 0 and attention.linear_q_up_proj.weight.grad.abs().sum() > 0


# (our parameter, transformers' parameter, index into it): embeddings and output layer, MLA's latent projections
# and norm, the router, routed experts (transformers fuses them as experts.gate_up_proj / down_proj) and the
# shared expert of the MoE layer.
GRADIENT_PAIRS = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", None),
    ("output_layer.weight", "lm_head.weight", None),
    ("decoder.layers.1.self_attention.linear_q_down_proj.weight", "model.layers.1.self_attn.q_a_proj.weight", None),
    ("decoder.layers.1.self_attention.kv_layernorm.weight", "model.layers.1.self_attn.kv_a_layernorm.weight", None),
    ("decoder.layers.1.self_attention.linear_proj.weight", "model.layers.1.self_attn.o_proj.weight", None),
    ("decoder.layers.1.mlp.router.weight", "model.layers.1.mlp.gate.weight", None),
    *[(f"decoder.layers.1.mlp.experts.local_experts.{expert}.linear_fc2.weight", "model.layers.1.mlp.experts.down_proj",
       expert) for expert in range(8)],
    ("decoder.layers.1.mlp.shared_experts.linear_fc2.weight", "model.layers.1.mlp.shared_experts.down_proj.weight", None),
    ("decoder.layers.0.mlp.linear_fc2.weight", "model.layers.0.mlp.down_proj.weight", None),
]


def test_gradients_match_transformers(hf_deepseek_v3_dir, convert, load_converted, tmp_path):
    """The LM loss's gradients equal transformers' through MLA with YaRN, grouped sigmoid routing with the expert
    bias and scaling, routed and shared experts, and the dense first layer."""
    _to_megatron(convert, hf_deepseek_v3_dir, tmp_path / "mg")
    model, _ = load_converted(tmp_path / "mg")
    assert_gradients_match_transformers(model, hf_deepseek_v3_dir, GRADIENT_PAIRS)


@pytest.mark.parametrize("layout", [[], ["--target-tensor-parallel-size", 2, "--target-expert-parallel-size", 2]],
                         ids=["tp1", "tp2-ep2"])
def test_round_trip_is_bit_identical(hf_dir, layout, convert, tmp_path):
    _to_megatron(convert, hf_dir, tmp_path / "mg", *layout)
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "deepseek_v3",
            "--load-dir", tmp_path / "mg", "--save-dir", tmp_path / "hf")
    assert_same_safetensors(hf_dir, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "routed_scaling_factor", "first_k_dense_replace",
                "n_shared_experts", "rope_parameters", "tie_word_embeddings", "rms_norm_eps"):
        assert saved.get(key) == source.get(key), key


def _with_config(hf_dir, directory, **changes):
    directory.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    (directory / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    return directory


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attention_bias": True}, "DeepSeek-V3 attention_bias=True cannot be expressed"),
        ({"rope_interleave": False}, "DeepSeek-V3 rope_interleave=False cannot be expressed"),
        ({"norm_topk_prob": False}, "DeepSeek-V3 norm_topk_prob=False cannot be expressed"),
        ({"rms_norm_eps": 1e-5}, "differs from its latent norms' fixed 1e-6"),
        ({"num_experts_per_tok": 2}, "num_experts_per_tok must be 2 x topk_group (4)"),
    ],
)
def test_what_megatron_cannot_reproduce_is_one_line(hf_deepseek_v3_dir, changes, message, tmp_path, capsys):
    bad = _with_config(hf_deepseek_v3_dir, tmp_path / "bad", **changes)
    argv = ["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "deepseek_v3",
            "--load-dir", str(bad), "--save-dir", str(tmp_path / "mg")]
    assert convert_main(argv) == 1
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "mg").exists()


def _with_prediction_depth(hf_dir, directory, extra=None):
    """The tiny model plus one multi-token prediction depth at layer index 2 in DeepSeek's layout (a copy of
    layer 1 with its own norms and projection, and copies of the embedding and output layer), and `extra`."""
    state = load_file(f"{hf_dir}/model.safetensors")
    generator = torch.Generator().manual_seed(2)
    depth = {name.replace("layers.1.", "layers.2."): tensor + 0.01 for name, tensor in state.items() if ".layers.1." in name}
    depth["model.layers.2.eh_proj.weight"] = torch.randn(64, 128, generator=generator)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        depth[f"model.layers.2.{name}.weight"] = torch.rand(64, generator=generator) + 0.5
    depth["model.layers.2.embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    depth["model.layers.2.shared_head.head.weight"] = state["lm_head.weight"].clone()
    directory = _with_config(hf_dir, directory)
    (directory / "model.safetensors").unlink()
    save_file({**state, **depth, **(extra or {})}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("layout", [["--target-expert-parallel-size", 2], ["--target-pipeline-parallel-size", 2]],
                         ids=["ep2", "pp2"])
def test_multi_token_prediction_depth_round_trips(hf_deepseek_v3_dir, layout, convert, load_converted, tmp_path, capsys):
    """At PP=2 the depth lives on the last stage with its copy of the word embeddings."""
    stray = {"model.layers.3.enorm.weight": torch.ones(64)}  # past num_nextn_predict_layers: dropped
    with_depth = _with_prediction_depth(hf_deepseek_v3_dir, tmp_path / "src", stray)
    _to_megatron(convert, with_depth, tmp_path / "mg", *layout)
    assert "dropped 1 tensor(s) of layers past" in capsys.readouterr().err
    model, args = load_converted(tmp_path / "mg")
    assert args.mtp_num_layers == 1
    projection = load_file(f"{with_depth}/model.safetensors")["model.layers.2.eh_proj.weight"]
    assert torch.equal(model.mtp.layers[0].eh_proj.weight, projection)
    if "--target-pipeline-parallel-size" in layout:
        last = torch.load(get_checkpoint_name(str(tmp_path / "mg"), 0, True, True, 0, 1), weights_only=False)["model"]
        assert torch.equal(last["embedding.word_embeddings.weight"], model.embedding.word_embeddings.weight)
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "deepseek_v3",
            "--load-dir", tmp_path / "mg", "--save-dir", tmp_path / "hf")
    expected = _with_prediction_depth(hf_deepseek_v3_dir, tmp_path / "expected")
    assert_same_safetensors(expected, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_generate_gives_transformers_greedy_ids(hf_deepseek_v3_dir, convert, tmp_path):
    """tools/generate.py decodes through MLA's latent cache."""
    _to_megatron(convert, hf_deepseek_v3_dir, tmp_path / "mg")
    assert_generate_matches_transformers(hf_deepseek_v3_dir, tmp_path / "mg")
