"""tools/checkpoint/convert.py: layouts on disk, bit-identical round trips, re-sharding, bad input."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron.training.checkpointing import get_checkpoint_name
from tests.conftest import REPO_ROOT
from tests.unit_tests.tools.conftest import VOCAB, assert_generate_matches_transformers, assert_same_safetensors
from tools.checkpoint.convert import main as convert_main

CONVERT = str(REPO_ROOT / "tools" / "checkpoint" / "convert.py")


def hf_to_mg(convert, hf_dir, save_dir, family, *extra):
    convert(
        "--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", family,
        "--load-dir", hf_dir, "--save-dir", save_dir, *extra,
    )


def mg_to_mg(convert, load_dir, save_dir, *extra):
    convert(
        "--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", load_dir, "--save-dir", save_dir, *extra
    )


def rank_file(save_dir, tensor_rank=0, pipeline_rank=0, pipeline_parallel=False):
    return get_checkpoint_name(
        str(save_dir), 0, release=True, pipeline_parallel=pipeline_parallel, tensor_rank=tensor_rank,
        pipeline_rank=pipeline_rank,
    )


def test_hf_to_megatron_writes_the_documented_layout(hf_llama_dir, convert, tmp_path):
    save_dir = tmp_path / "mg"
    hf_to_mg(convert, hf_llama_dir, save_dir, "llama3", "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2")
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert sorted(os.listdir(save_dir / "release")) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"
    ]
    checkpoint = torch.load(rank_file(save_dir, 1, 1, True), weights_only=False)
    assert checkpoint["checkpoint_version"] == 3.0 and checkpoint["iteration"] == 0
    args = checkpoint["args"]
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.kv_channels) == (2, 64, 2, 16)
    assert args.swiglu and args.use_rope_scaling and args.untie_embeddings_and_output_weights
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.padded_vocab_size) == (2, 2, VOCAB)
    model = checkpoint["model"]
    # The last stage of rank 1: its layer (local number 0), final norm and half of the output layer.
    assert model["output_layer.weight"].shape == (VOCAB // 2, 64)
    assert model["decoder.layers.0.mlp.linear_fc1.weight"].shape == (96, 64)
    assert not any(name.startswith("embedding.") for name in model)
    assert not list(tmp_path.glob("**/*.tmp*"))


def test_hf_megatron_hf_round_trip_is_bit_identical(hf_llama_dir, hf_qwen3_dir, hf_gpt2_dir, convert, tmp_path):
    from transformers import AutoModelForCausalLM

    for family, hf_dir, stack in (
        ("llama3", hf_llama_dir, "mcore"), ("qwen3", hf_qwen3_dir, "legacy"), ("gpt2", hf_gpt2_dir, "legacy")
    ):
        mg_dir, back = tmp_path / f"{family}_mg", tmp_path / f"{family}_hf"
        hf_to_mg(convert, hf_dir, mg_dir, family, "--target-tensor-parallel-size", "2",
                 "--target-pipeline-parallel-size", "2", f"--use-{stack}-models")
        convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", family,
                "--load-dir", mg_dir, "--save-dir", back)
        original, returned = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
        assert sorted(original) == sorted(returned)
        for name in original:
            assert torch.equal(original[name], returned[name]), name
        tokens = torch.randint(0, VOCAB, (1, 12))
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
            actual = AutoModelForCausalLM.from_pretrained(back).eval()(tokens).logits
        assert torch.equal(expected, actual)


def _rank_models(save_dir, files):
    return {name: torch.load(save_dir / "release" / name / "model_optim_rng.pt", weights_only=False)["model"]
            for name in files}


def test_legacy_mcore_legacy_round_trip_is_bit_identical(hf_llama_dir, convert, tmp_path):
    legacy, mcore, again = tmp_path / "legacy", tmp_path / "mcore", tmp_path / "legacy_again"
    hf_to_mg(convert, hf_llama_dir, legacy, "llama3", "--use-legacy-models", "--target-tensor-parallel-size", "2")
    mg_to_mg(convert, legacy, mcore, "--use-mcore-models", "--target-pipeline-parallel-size", "2")
    mg_to_mg(convert, mcore, again, "--use-legacy-models", "--target-tensor-parallel-size", "2")
    files = ["mp_rank_00", "mp_rank_01"]
    before, after = _rank_models(legacy, files), _rank_models(again, files)
    assert "language_model" in before["mp_rank_00"]  # Megatron-LM's nested legacy layout

    def flat(node, prefix=""):
        for key, value in node.items():
            yield from flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]

    for name in files:
        expected, actual = dict(flat(before[name])), dict(flat(after[name]))
        assert sorted(expected) == sorted(actual)
        assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_relayouts_keep_the_logits(hf_gpt2_dir, convert, load_converted, tmp_path):
    """Tied embeddings across pipeline stages, a padded vocabulary and both stacks: same logits."""
    reference_dir = tmp_path / "reference"
    hf_to_mg(convert, hf_gpt2_dir, reference_dir, "gpt2")
    sharded = tmp_path / "sharded"
    mg_to_mg(convert, reference_dir, sharded, "--use-legacy-models", "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2")
    assert "word_embeddings_for_head" in torch.load(rank_file(sharded, 0, 1, True), weights_only=False)["model"]
    padded = tmp_path / "padded"
    hf_to_mg(convert, hf_gpt2_dir, padded, "gpt2", "--make-vocab-size-divisible-by", "64")
    tokens = torch.randint(0, VOCAB, (2, 10))
    logits = []
    for directory in (reference_dir, sharded, padded):
        model, args = load_converted(directory)
        with torch.no_grad():
            logits.append(model(tokens, None, None)[..., :VOCAB])
    assert args.padded_vocab_size == 128
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])


def _run_cli(*flags):
    return subprocess.run([sys.executable, CONVERT, *map(str, flags)], capture_output=True, text=True)


def test_command_line_errors_are_one_clear_line(hf_llama_dir, convert, tmp_path):
    result = _run_cli("--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "llama9",
                      "--load-dir", hf_llama_dir, "--save-dir", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "convert.py: error: unknown --model-type-hf 'llama9'; choose one of: llama2, llama3, qwen3, gpt2, mixtral, qwen3_moe, deepseek_v3"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--model-type-hf", "qwen3"], "describes a 'llama' model, not --model-type-hf qwen3"),
        (["--model-type-hf", "llama3", "--target-pipeline-parallel-size", "3"], "num_layers 2 is not divisible"),
        (
            ["--model-type-hf", "llama3", "--target-tensor-parallel-size", "4"],
            "query groups (2) must both be divisible",
        ),
        ([], "needs --model-type-hf"),
    ],
)
def test_bad_hf_conversions(hf_llama_dir, tmp_path, capsys, flags, message):
    argv = ["--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", str(hf_llama_dir),
            "--save-dir", str(tmp_path / "out"), *flags]
    assert convert_main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoints_are_named(hf_llama_dir, convert, tmp_path, capsys):
    save_dir = tmp_path / "mg"
    hf_to_mg(convert, hf_llama_dir, save_dir, "llama3", "--target-tensor-parallel-size", "2")
    path = rank_file(save_dir, 1)
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama3",
            "--load-dir", str(save_dir), "--save-dir", str(tmp_path / "hf")]
    assert convert_main(argv) == 1
    assert f"{path} cannot be read" in capsys.readouterr().err
    os.remove(path)
    assert convert_main(argv) == 1
    assert f"{path} is missing" in capsys.readouterr().err
    os.rmdir(os.path.dirname(path))
    assert convert_main(argv) == 1
    assert "lacks mp_rank_01 of its 2 x 1 (tensor x pipeline) layout" in capsys.readouterr().err
    assert convert_main([*argv[:-4], "--load-dir", str(tmp_path), "--save-dir", str(tmp_path / "x")]) == 1
    assert "not a Megatron checkpoint directory" in capsys.readouterr().err


def test_a_megatron_model_transformers_cannot_express_is_refused(hf_gpt2_dir, convert, tmp_path, capsys):
    save_dir = tmp_path / "mg"
    hf_to_mg(convert, hf_gpt2_dir, save_dir, "gpt2")
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama2",
            "--load-dir", str(save_dir), "--save-dir", str(tmp_path / "hf")]
    assert convert_main(argv) == 1
    assert "cannot be expressed as LlamaForCausalLM" in capsys.readouterr().err


def test_megatron_lm_transformer_engine_checkpoints_are_read(hf_gpt2_dir, convert, tmp_path):
    """Megatron-LM's TE spec fuses the pre-norms into linear_qkv / linear_fc1, stores _extra_state, and saves
    num_query_groups=1 without grouped-query attention: all of that reads into the same model."""
    import io

    ours, foreign, back = tmp_path / "ours", tmp_path / "foreign", tmp_path / "hf"
    hf_to_mg(convert, hf_gpt2_dir, ours, "gpt2")
    checkpoint = torch.load(rank_file(ours), weights_only=False)
    renamed = {}
    for name, tensor in checkpoint["model"].items():
        name = name.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
        renamed[name.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")] = tensor
    renamed["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO()
    checkpoint["model"] = renamed
    checkpoint["args"].transformer_impl = "transformer_engine"
    checkpoint["args"].num_query_groups = 1
    os.makedirs(os.path.dirname(rank_file(foreign)))
    torch.save(checkpoint, rank_file(foreign))
    (foreign / "latest_checkpointed_iteration.txt").write_text("release")
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "gpt2",
            "--load-dir", foreign, "--save-dir", back)
    original, returned = load_file(hf_gpt2_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(torch.equal(original[name], returned[name]) for name in original)


def test_interleaved_pipeline_checkpoints_are_read(convert, tmp_path):
    """--num-layers-per-virtual-pipeline-stage checkpoints hold model0, model1 per rank file with local layer
    numbers; with 4 layers over 2 stages x 2 chunks the layers go round-robin: stage 0 holds 0 and 2, stage 1
    holds 1 and 3."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "hf")
    hf_to_mg(convert, tmp_path / "hf", tmp_path / "flat", "llama2")
    checkpoint = torch.load(rank_file(tmp_path / "flat"), weights_only=False)
    state = checkpoint["model"]
    checkpoint["args"].pipeline_model_parallel_size = 2
    checkpoint["args"].virtual_pipeline_model_parallel_size = 2
    global_layers = {(0, 0): 0, (1, 0): 1, (0, 1): 2, (1, 1): 3}  # (stage, chunk) -> global layer
    for stage in (0, 1):
        chunks = {}
        for chunk in (0, 1):
            prefix = f"decoder.layers.{global_layers[(stage, chunk)]}."
            chunk_state = {"decoder.layers.0." + name[len(prefix):]: tensor
                           for name, tensor in state.items() if name.startswith(prefix)}
            if (stage, chunk) == (0, 0):
                chunk_state["embedding.word_embeddings.weight"] = state["embedding.word_embeddings.weight"]
            if (stage, chunk) == (1, 1):
                for name in ("decoder.final_layernorm.weight", "output_layer.weight"):
                    chunk_state[name] = state[name]
            chunks[f"model{chunk}"] = chunk_state
        path = rank_file(tmp_path / "interleaved", 0, stage, True)
        os.makedirs(os.path.dirname(path))
        torch.save({"args": checkpoint["args"], "iteration": 0, **chunks}, path)
    (tmp_path / "interleaved" / "latest_checkpointed_iteration.txt").write_text("release")
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama2",
            "--load-dir", tmp_path / "interleaved", "--save-dir", tmp_path / "back")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    returned = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(original) == sorted(returned)
    assert all(torch.equal(original[name], returned[name]) for name in original)


def megatron_lm_args(name):
    """A Namespace of Megatron-LM's own saved arguments, from tests/unit_tests/tools/data (see its README)."""
    with open(REPO_ROOT / "tests" / "unit_tests" / "tools" / "data" / name) as file:
        fields = json.load(file)
    decode = lambda value: getattr(torch, value["torch.dtype"]) if isinstance(value, dict) else value
    return argparse.Namespace(**{name: decode(value) for name, value in fields.items()})


def test_checkpoints_carrying_megatron_lms_own_args_convert_and_generate(convert, tmp_path):
    """A checkpoint whose `args` are all 353 that Megatron-LM core_v0.9.0 saves for a Llama-2-style model (not
    ours): the converter and tools/generate.py read the model from them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.3)
    LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "hf")
    hf_to_mg(convert, tmp_path / "hf", tmp_path / "ours", "llama2")
    weights = torch.load(rank_file(tmp_path / "ours"), weights_only=False)["model"]
    foreign = tmp_path / "megatron_lm"
    path = get_checkpoint_name(str(foreign), 10)
    os.makedirs(os.path.dirname(path))
    torch.save({"args": megatron_lm_args("megatron_lm_core_v0.9.0_llama_args.json"), "checkpoint_version": 3.0,
                "iteration": 10, "model": weights, "num_floating_point_operations_so_far": 0}, path)
    (foreign / "latest_checkpointed_iteration.txt").write_text("10")

    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama2",
            "--load-dir", foreign, "--save-dir", tmp_path / "back")
    assert_same_safetensors(tmp_path / "hf", tmp_path / "back")
    assert_generate_matches_transformers(tmp_path / "hf", foreign)
