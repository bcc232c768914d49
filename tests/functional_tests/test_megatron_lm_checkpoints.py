"""A checkpoint written by Megatron-LM itself carries its own `args` (all 353 of core_v0.9.0 for a Llama-2-style
model, tests/unit_tests/tools/data): pretrain_gpt.py, run with the same command line, resumes from it."""

import os

import torch

from megatron.training.checkpointing import get_checkpoint_name
from tests.functional_tests.training_runs import lm_losses, run_pretrain
from tests.unit_tests.tools.test_convert import megatron_lm_args
from tools.checkpoint.convert import main as convert_main

# The command line the args were produced from (tests/unit_tests/tools/data/README.md), minus the save flags.
MEGATRON_LM_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--seq-length", "64", "--max-position-embeddings", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-4", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-5", "--swiglu", "--position-embedding-type", "rope", "--rotary-base", "10000",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--no-masked-softmax-fusion",
    "--no-gradient-accumulation-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--attention-dropout", "0.0",
    "--hidden-dropout", "0.0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "95",
    "--make-vocab-size-divisible-by", "1", "--use-mcore-models", "--transformer-impl", "local", "--mock-data",
    "--log-interval", "1", "--device", "cpu",
]


def test_training_resumes_from_a_checkpoint_with_megatron_lms_args(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    ours, foreign = tmp_path / "ours", tmp_path / "megatron_lm"
    assert convert_main(["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "llama2",
                         "--load-dir", str(tmp_path / "hf"), "--save-dir", str(ours)]) == 0
    weights = torch.load(get_checkpoint_name(str(ours), 0, release=True), weights_only=False)["model"]
    args = megatron_lm_args("megatron_lm_core_v0.9.0_llama_args.json")
    args.consumed_train_samples, args.consumed_valid_samples = 0, 0  # set by its training loop before a save
    path = get_checkpoint_name(str(foreign), 10)
    os.makedirs(os.path.dirname(path))
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 10, "model": weights,
                "num_floating_point_operations_so_far": 0}, path)
    (foreign / "latest_checkpointed_iteration.txt").write_text("10")

    resumed = run_pretrain([*MEGATRON_LM_FLAGS, "--train-iters", "11", "--load", foreign, "--no-load-optim", "--no-load-rng"])
    assert resumed.returncode == 0, resumed.stderr
    assert f"successfully loaded checkpoint from {foreign} at iteration 10" in resumed.stdout
    # The same weights through our own conversion, from iteration 0 on the same first batch: the same loss.
    fresh = run_pretrain([*MEGATRON_LM_FLAGS, "--train-iters", "1", "--load", ours, "--finetune"])
    assert fresh.returncode == 0, fresh.stderr
    assert list(lm_losses(resumed.stdout)) == [11]
    assert lm_losses(resumed.stdout)[11] == lm_losses(fresh.stdout)[1]
