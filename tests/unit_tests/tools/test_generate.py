"""tools/generate.py: greedy ids equal transformers' greedy generate; the cache equals recomputation."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.unit_tests.tools.conftest import VOCAB
from tools.generate import generate, main, next_token

GENERATE = str(REPO_ROOT / "tools" / "generate.py")
PROMPT = [5, 17, 42, 8, 77, 3]


@pytest.fixture(
    params=[("llama3", "hf_llama_dir", "--use-mcore-models"), ("gpt2", "hf_gpt2_dir", "--use-legacy-models")],
    ids=["llama3-mcore", "gpt2-legacy"],
)
def checkpoint(request, convert, tmp_path):
    family, fixture, stack = request.param
    hf_dir = request.getfixturevalue(fixture)
    save_dir = tmp_path / "mg"
    convert("--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", family,
            "--load-dir", hf_dir, "--save-dir", save_dir, "--target-tensor-parallel-size", "2", stack)
    return hf_dir, save_dir


def test_greedy_ids_equal_transformers_generate(checkpoint, load_converted):
    from transformers import AutoModelForCausalLM

    hf_dir, save_dir = checkpoint
    model, _ = load_converted(save_dir)
    ours = generate(model, PROMPT, max_new_tokens=24, vocab_size=VOCAB)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    expected = hf_model.generate(
        torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPT):].tolist()
    assert ours == expected
    assert len(set(ours)) > 1


def test_cached_decoding_equals_full_recomputation(checkpoint, load_converted):
    model, _ = load_converted(checkpoint[1])
    generated = generate(model, PROMPT, max_new_tokens=10, vocab_size=VOCAB)
    sequence = PROMPT + generated
    with torch.no_grad():
        full = model(torch.tensor([sequence]), None, None)[0]
    assert full[len(PROMPT) - 1:-1, :VOCAB].argmax(-1).tolist() == generated


def test_sampling_is_seeded_and_respects_top_k():
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    assert next_token(logits, None, 0, 0.0, torch.Generator()) == 1
    draws = {next_token(logits, 1.0, 2, 0.0, torch.Generator().manual_seed(seed)) for seed in range(40)}
    assert draws == {1, 2}
    # Token 1 alone holds 52% of the probability, 1 and 2 together 99.6%.
    assert {next_token(logits, 1.0, 0, 0.5, torch.Generator().manual_seed(seed)) for seed in range(40)} == {1}
    assert {next_token(logits, 1.0, 0, 0.9, torch.Generator().manual_seed(seed)) for seed in range(40)} == {1, 2}
    first = [next_token(logits, 2.0, 0, 0.0, torch.Generator().manual_seed(7)) for _ in range(3)]
    assert len(set(first)) == 1


def test_command_line_prints_ids(checkpoint):
    result = subprocess.run(
        [sys.executable, GENERATE, "--load", checkpoint[1], "--prompt-ids", ",".join(map(str, PROMPT)),
         "--max-new-tokens", "4"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "prompt ids: " + " ".join(map(str, PROMPT))
    assert lines[1].startswith("generated ids: ") and len(lines[1].split()) == 6


def test_bad_input_messages(checkpoint, capsys):
    save_dir = str(checkpoint[1])
    assert main(["--load", save_dir, "--prompt", "hello"]) == 1
    assert "--prompt TEXT needs a tokenizer" in capsys.readouterr().err
    assert main(["--load", save_dir, "--prompt-ids", f"1,{VOCAB + 5}"]) == 1
    assert f"outside the vocabulary of {VOCAB}" in capsys.readouterr().err
    assert main(["--load", save_dir, "--prompt-ids", "1,2", "--ffn-hidden-size", "40"]) == 1
    assert "the checkpoint does not fit the model built from the flags" in capsys.readouterr().err


def test_training_layout_settings_do_not_leak_into_generation(hf_gpt2_dir, convert, load_converted, tmp_path):
    """A checkpoint saved at TP=2 with sequence parallelism, bf16 and a vocabulary padded for two ranks
    generates on one CPU process as the fp32 model does."""
    from megatron.training.checkpointing import get_checkpoint_name

    reference_dir, trained_dir = tmp_path / "reference", tmp_path / "trained"
    flags = ["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "gpt2", "--load-dir", hf_gpt2_dir]
    convert(*flags, "--save-dir", reference_dir)
    convert(*flags, "--save-dir", trained_dir, "--target-tensor-parallel-size", "2",
            "--make-vocab-size-divisible-by", "96")
    for rank in (0, 1):
        path = get_checkpoint_name(str(trained_dir), 0, release=True, pipeline_parallel=False, tensor_rank=rank)
        checkpoint = torch.load(path, weights_only=False)
        assert checkpoint["model"]["embedding.word_embeddings.weight"].shape[0] == 96  # 192 rows over 2 ranks
        checkpoint["args"].sequence_parallel = checkpoint["args"].bf16 = True
        checkpoint["args"].params_dtype = torch.bfloat16
        torch.save(checkpoint, path)
    expected = generate(load_converted(reference_dir)[0], PROMPT, max_new_tokens=12, vocab_size=VOCAB)
    model, args = load_converted(trained_dir)
    assert (args.padded_vocab_size, args.sequence_parallel) == (96, False)
    assert next(model.parameters()).dtype == torch.float32
    assert generate(model, PROMPT, max_new_tokens=12, vocab_size=VOCAB) == expected
