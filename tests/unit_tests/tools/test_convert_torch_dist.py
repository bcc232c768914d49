"""tools/checkpoint/convert.py with Megatron's torch_dist format: the layout on disk, bit-identical round trips
HF -> torch_dist -> HF and torch (TP2 x PP2) -> torch_dist -> torch, the training loop and the published
megatron-core loading the result, and the training loop's torch_dist checkpoints read back."""

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from tests.conftest import free_port
from tests.functional_tests.training_runs import run_pretrain
from tests.unit_tests.core.dist_checkpointing.test_megatron_interop import REFERENCE_PRELUDE
from tests.unit_tests.tools.conftest import VOCAB, assert_logits_match_transformers, assert_same_safetensors
from tests.unit_tests.tools.test_convert import hf_to_mg, mg_to_mg
from tools.checkpoint.checkpoint_files import read_megatron_checkpoint
from tools.checkpoint.convert import main as convert_main

FAMILIES = {
    "llama3": "hf_llama_dir",  # stacked layers, SwiGLU, GQA, untied
    "qwen3": "hf_qwen3_dir",  # q/k norms, tied embeddings
    "mixtral": "hf_mixtral_dir",  # stacked layers with an expert axis
    "qwen3_moe": "hf_qwen3_moe_dir",  # a dense first layer: per-layer keys
    "deepseek_v3": "hf_deepseek_v3_dir",  # MLA, shared expert, MTP
}


def to_torch_dist(convert, load_type, load_dir, save_dir, *extra):
    convert("--load-model-type", load_type, "--save-model-type", "mg", "--load-dir", load_dir, "--save-dir", save_dir,
            "--save-ckpt-format", "torch_dist", *extra)


def read_tensor(directory, key, shape, dtype=torch.float32):
    """One whole global tensor of a torch_dist directory."""
    tensor = torch.empty(shape, dtype=dtype)
    dist_checkpointing.load_entries(str(directory), dist_checkpointing.read_checkpoint_metadata(str(directory)),
                 [ShardedTensor(key, tensor, shape, (0,) * len(shape))], [])
    return tensor


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_torch_dist_hf_round_trip_is_bit_identical(family, request, convert, tmp_path):
    hf_dir = request.getfixturevalue(FAMILIES[family])
    to_torch_dist(convert, "hf", hf_dir, tmp_path / "dist", "--model-type-hf", family)
    convert("--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", family,
            "--load-dir", tmp_path / "dist", "--save-dir", tmp_path / "hf")
    assert_same_safetensors(hf_dir, tmp_path / "hf")


def test_generate_reads_torch_dist(hf_llama_dir, convert, load_converted, tmp_path):
    """tools/generate.py's loader reads either format: transformers' logits from the torch_dist checkpoint."""
    to_torch_dist(convert, "hf", hf_llama_dir, tmp_path / "dist", "--model-type-hf", "llama3")
    model, _ = load_converted(tmp_path / "dist")
    assert_logits_match_transformers(model, hf_llama_dir)


def test_torch_dist_output_is_megatrons_layout(hf_llama_dir, convert, tmp_path):
    """Global tensors under megatron-core's keys (layer axis, fused-norm names, SwiGLU as HF's [gate; up]), an
    extra-state object per linear layer, the common state; the recorded layout pads the vocabulary."""
    save_dir = tmp_path / "dist"
    to_torch_dist(convert, "hf", hf_llama_dir, save_dir, "--model-type-hf", "llama3",
                  "--target-tensor-parallel-size", 2, "--make-vocab-size-divisible-by", 64)
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "release"
    directory = save_dir / "release"
    assert sorted(os.listdir(directory)) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    assert not list(tmp_path.glob("**/*.tmp*"))
    common = dist_checkpointing.load_common_state_dict(str(directory))
    assert (common["checkpoint_version"], common["iteration"]) == (3.0, 0)
    args = common["args"]
    assert (args.ckpt_format, args.tensor_model_parallel_size, args.padded_vocab_size) == ("torch_dist", 2, 128)
    saved = dist_checkpointing.read_checkpoint_metadata(str(directory)).state_dict_metadata
    shapes = {key: tuple(value.size) for key, value in saved.items() if hasattr(value, "size")}
    assert shapes == {
        "embedding.word_embeddings.weight": (128, 64),
        "output_layer.weight": (128, 64),
        "decoder.final_layernorm.weight": (64,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (2, 64),
        "decoder.layers.self_attention.linear_qkv.weight": (2, 128, 64),
        "decoder.layers.self_attention.linear_proj.weight": (2, 64, 64),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (2, 64),
        "decoder.layers.mlp.linear_fc1.weight": (2, 192, 64),
        "decoder.layers.mlp.linear_fc2.weight": (2, 64, 96),
    }
    extra = {key for key in saved if "_extra_state" in key}
    assert extra == {
        f"decoder.layers.{name}._extra_state/shard_{layer}_2"
        for name in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
        for layer in (0, 1)
    }
    hf = load_file(hf_llama_dir / "model.safetensors")
    fc1 = read_tensor(directory, "decoder.layers.mlp.linear_fc1.weight", (2, 192, 64))
    gate_up = torch.cat([hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]])
    assert torch.equal(fc1[1], gate_up)
    embedding = read_tensor(directory, "embedding.word_embeddings.weight", (128, 64))
    assert torch.equal(embedding[:VOCAB], hf["model.embed_tokens.weight"])


@pytest.mark.parametrize("stack", ["mcore", "legacy"])
def test_torch_tp2_pp2_to_torch_dist_to_torch_keeps_the_state(hf_llama_dir, convert, tmp_path, stack):
    parallel, dist_dir, single = tmp_path / "tp2pp2", tmp_path / "dist", tmp_path / "tp1"
    hf_to_mg(convert, hf_llama_dir, parallel, "llama3", f"--use-{stack}-models", "--target-tensor-parallel-size", 2,
             "--target-pipeline-parallel-size", 2)
    to_torch_dist(convert, "mg", parallel, dist_dir)
    mg_to_mg(convert, dist_dir, single)
    source_args, source = read_megatron_checkpoint(str(parallel))
    args, state = read_megatron_checkpoint(str(single))
    assert args.use_legacy_models == source_args.use_legacy_models == (stack == "legacy")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.ckpt_format) == (1, 1, "torch")
    assert os.listdir(single / "release") == ["mp_rank_00"]
    assert sorted(state) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name


def test_training_loop_and_converter_read_each_others_torch_dist(hf_llama_dir, convert, tmp_path):
    """pretrain_gpt.py --use-checkpoint-args --finetune reads the converter's torch_dist output; at learning
    rate 0 the torch_dist checkpoint it saves (optimizer and RNG state included) reads back in the converter as
    the same tensors."""
    dist_dir, trained, reference = tmp_path / "dist", tmp_path / "trained", tmp_path / "reference"
    to_torch_dist(convert, "hf", hf_llama_dir, dist_dir, "--model-type-hf", "llama3")
    hf_to_mg(convert, hf_llama_dir, reference, "llama3")
    result = run_pretrain([
        "--use-checkpoint-args", "--load", dist_dir, "--ckpt-format", "torch_dist", "--finetune",
        "--save", trained, "--save-interval", 1,
        "--train-iters", 1, "--lr", 0.0, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB - 1,
        "--micro-batch-size", 1, "--seq-length", 16, "--device", "cpu", "--eval-iters", 0, "--log-interval", 1,
    ])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(torch_dist)" in result.stdout
    assert dist_checkpointing.check_is_distributed_checkpoint(str(trained / "iter_0000001"))
    _, expected = read_megatron_checkpoint(str(reference))
    _, actual = read_megatron_checkpoint(str(trained))
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


# megatron-core's GPTModel (local spec) of the same shapes as the conftest's Llama and Mixtral.
REFERENCE_MODELS = {
    "llama3": ("hf_llama_dir", dict(ffn_hidden_size=96)),
    "mixtral": ("hf_mixtral_dir", dict(
        ffn_hidden_size=32, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_token_dispatcher_type="allgather",
    )),
}


@pytest.mark.parametrize("family", list(REFERENCE_MODELS))
def test_megatron_core_loads_the_converted_checkpoint_strictly(family, request, convert, run_reference_megatron, tmp_path):
    """The published megatron-core's dist_checkpointing.load, asked to raise on any missing or unexpected key
    (the `_extra_state` objects included), fills its own model with the tensors our torch format holds."""
    fixture, fields = REFERENCE_MODELS[family]
    hf_dir = request.getfixturevalue(fixture)
    to_torch_dist(convert, "hf", hf_dir, tmp_path / "dist", "--model-type-hf", family)
    hf_to_mg(convert, hf_dir, tmp_path / "torch", family)
    fields = dict(
        fields, num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, gated_linear_unit=True,
        add_bias_linear=False, normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True,
    )
    loaded = tmp_path / "loaded.pt"
    run_reference_megatron(REFERENCE_PRELUDE.format(port=free_port(), fields=repr(fields), vocab=VOCAB) + f"""
import argparse
from megatron.core.dist_checkpointing.validation import StrictHandling
torch.serialization.add_safe_globals([argparse.Namespace])  # as Megatron-LM's training does for common.pt
state = dist_checkpointing.load(model.sharded_state_dict(), {str(tmp_path / "dist" / "release")!r}, strict=StrictHandling.RAISE_ALL)
assert (state.pop("iteration"), state.pop("checkpoint_version"), state.pop("args").num_layers) == (0, 3.0, 2)
model.load_state_dict(state)
torch.save({{name: tensor for name, tensor in model.state_dict().items() if not name.endswith("_extra_state")}}, {str(loaded)!r})
""")
    _, expected = read_megatron_checkpoint(str(tmp_path / "torch"))
    theirs = torch.load(loaded, weights_only=True)
    assert sorted(theirs) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(theirs[name], tensor), name


def test_incomplete_torch_dist_checkpoint_and_hf_output_format_are_one_line(hf_llama_dir, convert, tmp_path, capsys):
    to_torch_dist(convert, "hf", hf_llama_dir, tmp_path / "dist", "--model-type-hf", "llama3")
    os.remove(tmp_path / "dist" / "release" / "metadata.json")
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama3",
            "--load-dir", str(tmp_path / "dist"), "--save-dir", str(tmp_path / "hf")]
    assert convert_main(argv) == 1
    assert "is an incomplete torch_dist checkpoint (its metadata.json is missing" in capsys.readouterr().err
    assert convert_main([*argv, "--save-ckpt-format", "torch_dist"]) == 1
    assert "--save-ckpt-format applies to Megatron output (--save-model-type mg) only" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_saved_args_unlike_the_saved_tensors_are_one_line(hf_llama_dir, convert, tmp_path, capsys):
    to_torch_dist(convert, "hf", hf_llama_dir, tmp_path / "dist", "--model-type-hf", "llama3")
    common_path = tmp_path / "dist" / "release" / "common.pt"
    common = torch.load(common_path, weights_only=False)
    common["args"].padded_vocab_size = 128  # the embedding was saved with 96 rows
    torch.save(common, common_path)
    argv = ["--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf", "llama3",
            "--load-dir", str(tmp_path / "dist"), "--save-dir", str(tmp_path / "hf")]
    assert convert_main(argv) == 1
    error = capsys.readouterr().err
    assert "does not fit the model built from the flags" in error and "embedding.word_embeddings.weight" in error
    common["args"].hidden_size = 32
    torch.save(common, common_path)
    assert convert_main(argv) == 1
    assert "has global shape (2, 64) in the checkpoint but (2, 32) in this model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
