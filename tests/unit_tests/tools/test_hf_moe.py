"""Mixtral and Qwen3-MoE through the converter: transformers' logits, bit-identical round trips (also through
an expert-parallel layout), greedy generation, and one line for what cannot be expressed."""

import json

import pytest
import torch

from megatron.training.checkpointing import get_checkpoint_name
from tests.unit_tests.tools.conftest import (
    VOCAB,
    assert_generate_matches_transformers,
    assert_gradients_match_transformers,
    assert_logits_match_transformers,
    assert_same_safetensors,
    assert_training_loss_matches_transformers,
)
from tools.checkpoint.convert import main as convert_main

FAMILIES = {"mixtral": "hf_mixtral_dir", "qwen3_moe": "hf_qwen3_moe_dir"}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param, request.getfixturevalue(FAMILIES[request.param])


def _to_megatron(convert, family, hf_dir, save_dir, *extra):
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", family,
            "--load-dir", hf_dir, "--save-dir", save_dir, *extra)


def test_logits_match_transformers(family, convert, load_converted, tmp_path):
    name, hf_dir = family
    _to_megatron(convert, name, hf_dir, tmp_path / "mg")
    model, args = load_converted(tmp_path / "mg")
    assert args.num_experts in (4, 8)
    assert_logits_match_transformers(model, hf_dir)


def test_training_loss_matches_transformers(family, convert, load_converted, tmp_path):
    """Routing in training mode (the aux loss attached, not added to the LM loss) gives transformers' loss."""
    name, hf_dir = family
    _to_megatron(convert, name, hf_dir, tmp_path / "mg")
    model, _ = load_converted(tmp_path / "mg")
    assert_training_loss_matches_transformers(model, hf_dir)
    assert model.decoder.layers[1].mlp.router.weight.grad.abs().sum() > 0


# (our parameter, transformers' parameter, index into it) of the weights whose gradients are compared.
GRADIENT_PAIRS = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", None),
    ("output_layer.weight", "lm_head.weight", None),
    ("decoder.layers.1.mlp.router.weight", "model.layers.1.mlp.gate.weight", None),
    *[(f"decoder.layers.1.mlp.experts.local_experts.{expert}.linear_fc2.weight", "model.layers.1.mlp.experts.down_proj", expert)
      for expert in range(4)],
]


def test_gradients_match_transformers(family, convert, load_converted, tmp_path):
    """The LM loss's gradients equal transformers' for the embeddings, the output layer, a router and routed
    experts."""
    name, hf_dir = family
    _to_megatron(convert, name, hf_dir, tmp_path / "mg")
    model, _ = load_converted(tmp_path / "mg")
    assert_gradients_match_transformers(model, hf_dir, GRADIENT_PAIRS)


def test_round_trip_through_expert_parallel_is_bit_identical(family, convert, tmp_path):
    name, hf_dir = family
    _to_megatron(convert, name, hf_dir, tmp_path / "ep2", "--target-expert-parallel-size", 2)
    local = torch.load(get_checkpoint_name(str(tmp_path / "ep2"), 0, True, False, 0, 0, True, 1), weights_only=False)
    experts = {key.split("local_experts.")[1].split(".")[0] for key in local["model"] if "local_experts." in key}
    assert experts == {str(index) for index in range(len(experts))} and len(experts) in (2, 4)
    convert("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", tmp_path / "ep2",
            "--save-dir", tmp_path / "ep1")
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", name,
            "--load-dir", tmp_path / "ep1", "--save-dir", tmp_path / "hf")
    assert_same_safetensors(hf_dir, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for key in ("num_experts_per_tok", "num_local_experts", "num_experts", "norm_topk_prob", "mlp_only_layers"):
        assert saved.get(key) == source.get(key), key


def test_generate_gives_transformers_greedy_ids(hf_mixtral_dir, convert, tmp_path):
    _to_megatron(convert, "mixtral", hf_mixtral_dir, tmp_path / "mg")
    assert_generate_matches_transformers(hf_mixtral_dir, tmp_path / "mg")


def test_what_transformers_cannot_express_is_one_line(hf_mixtral_dir, tmp_path, capsys):
    config = json.loads((hf_mixtral_dir / "config.json").read_text())
    bad = tmp_path / "jitter"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**config, "router_jitter_noise": 0.1}))
    (bad / "model.safetensors").symlink_to(hf_mixtral_dir / "model.safetensors")
    argv = ["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "mixtral",
            "--load-dir", str(bad), "--save-dir", str(tmp_path / "mg")]
    assert convert_main(argv) == 1
    error = capsys.readouterr().err
    assert "router_jitter_noise > 0 is not supported" in error and error.count("\n") == 1
    assert convert_main([*argv[:7], str(hf_mixtral_dir), "--save-dir", str(tmp_path / "ep3"),
                         "--target-expert-parallel-size", "3"]) == 1
    assert "--num-experts 4 is not divisible by --expert-model-parallel-size 3" in capsys.readouterr().err


def test_checkpoint_with_whole_experts_under_tensor_parallelism_is_refused(hf_mixtral_dir, convert, tmp_path, capsys):
    """ETP=1 at TP=2 keeps whole experts in each tensor-parallel file; the converter reads experts split like the
    other layers, so it says so instead of merging copies."""
    _to_megatron(convert, "mixtral", hf_mixtral_dir, tmp_path / "tp2", "--target-tensor-parallel-size", 2)
    for tensor_rank in range(2):
        path = get_checkpoint_name(str(tmp_path / "tp2"), 0, True, False, tensor_rank)
        checkpoint = torch.load(path, weights_only=False)
        assert checkpoint["args"].expert_tensor_parallel_size == 2
        checkpoint["args"].expert_tensor_parallel_size = 1
        torch.save(checkpoint, path)
    argv = ["--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", str(tmp_path / "tp2"),
            "--save-dir", str(tmp_path / "tp1")]
    assert convert_main(argv) == 1
    error = capsys.readouterr().err
    assert "saved with --expert-tensor-parallel-size 1 at --tensor-model-parallel-size 2" in error
    assert error.count("\n") == 1
