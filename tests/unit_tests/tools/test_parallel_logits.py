"""Checkpoints converted from Hugging Face to tensor x pipeline parallel layouts, run by the models' own
parallel layers on gloo ranks (tests/unit_tests/tools/parallel_logits.py), give the Hugging Face logits: the
shards are exactly the slices each rank's layers expect (fused QKV per query group, gate/up halves,
vocabulary-parallel embedding and output, local layer numbers per stage)."""

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.functional_tests.training_runs import free_port
from tests.unit_tests.tools.conftest import VOCAB
from tests.unit_tests.tools.test_convert import hf_to_mg, mg_to_mg, rank_file
from tools.checkpoint.convert import main as convert_main

PARALLEL_LOGITS = str(REPO_ROOT / "tests" / "unit_tests" / "tools" / "parallel_logits.py")


def parallel_logits(checkpoint_dir, tensor_size, pipeline_size, tokens, work_dir):
    """[batch, sequence, padded vocabulary] logits of the checkpoint run at its own layout."""
    tokens_path, logits_path = work_dir / "tokens.pt", work_dir / "logits.pt"
    torch.save(tokens, tokens_path)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tensor_size * pipeline_size),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), PARALLEL_LOGITS,
            str(checkpoint_dir), str(tensor_size), str(pipeline_size), str(tokens_path), str(logits_path),
        ],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(logits_path)


@pytest.mark.parametrize(
    "family,stack,tensor_size,pipeline_size",
    [("llama3", "mcore", 2, 2), ("qwen3", "legacy", 2, 2), ("qwen3", "mcore", 2, 1)],
)
def test_sharded_checkpoints_give_the_hugging_face_logits(
    hf_llama_dir, hf_qwen3_dir, convert, tmp_path, family, stack, tensor_size, pipeline_size
):
    from transformers import AutoModelForCausalLM

    hf_dir = hf_llama_dir if family == "llama3" else hf_qwen3_dir
    save_dir = tmp_path / "mg"
    hf_to_mg(convert, hf_dir, save_dir, family, f"--use-{stack}-models", "--make-vocab-size-divisible-by", "7",
             "--target-tensor-parallel-size", tensor_size, "--target-pipeline-parallel-size", pipeline_size)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits
    actual = parallel_logits(save_dir, tensor_size, pipeline_size, tokens, tmp_path)
    assert actual.shape == (2, 12, 98)  # 96 padded to a multiple of 7 x 2
    torch.testing.assert_close(actual[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)


def test_uneven_pipeline_split(tmp_path, convert):
    """Three layers over two stages (the first holds one): each stage file holds its layers under local
    numbers, the model runs at that split with the Hugging Face logits, and re-sharding keeps the split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.3)
    hf_model = LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    uneven, moved = tmp_path / "uneven", tmp_path / "moved"
    hf_to_mg(convert, tmp_path / "hf", uneven, "llama2", "--target-tensor-parallel-size", 2,
             "--target-pipeline-parallel-size", 2, "--target-decoder-first-pipeline-num-layers", 1)
    for stage, expected_layers in ((0, {0}), (1, {0, 1})):
        checkpoint = torch.load(rank_file(uneven, 1, stage, True), weights_only=False)
        assert {int(name.split(".")[2]) for name in checkpoint["model"] if name.startswith("decoder.layers.")} == (
            expected_layers
        )
        assert checkpoint["args"].decoder_first_pipeline_num_layers == 1
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf_model(tokens).logits
    torch.testing.assert_close(parallel_logits(uneven, 2, 2, tokens, tmp_path)[..., :VOCAB], expected,
                               rtol=1e-4, atol=1e-4)

    mg_to_mg(convert, uneven, moved, "--target-pipeline-parallel-size", 2)
    assert torch.load(rank_file(moved, 0, 1, True), weights_only=False)["args"].decoder_first_pipeline_num_layers == 1
    assert convert_main(["--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", str(uneven),
                         "--save-dir", str(tmp_path / "bad"), "--target-pipeline-parallel-size", "2",
                         "--target-decoder-first-pipeline-num-layers", "3"]) == 1
    assert not (tmp_path / "bad").exists()
