"""pretrain_gpt.py given bad data input stops before training with one clear line and a non-zero status."""

import os
import re

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.functional_tests.training_runs import require_data_pipeline, run_pretrain, training_flags


@pytest.fixture(scope="module")
def tiny_prefix(tmp_path_factory):
    """Three short documents: 30 tokens in all."""
    prefix = str(tmp_path_factory.mktemp("data") / "tiny")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for document in ([11, 12, 13, 14, 50256], list(range(100, 119)) + [50256], [7, 8, 9, 10, 50256]):
        builder.add_document(document, [len(document)])
    builder.finalize(prefix + ".idx")
    return prefix


def _damaged_copy(prefix, directory, damage):
    copy = str(directory / "damaged")
    for suffix in (".bin", ".idx"):
        with open(prefix + suffix, "rb") as source, open(copy + suffix, "wb") as target:
            target.write(source.read())
    damage(copy)
    return copy


def _wrong_magic(prefix):
    with open(prefix + ".idx", "r+b") as stream:
        stream.write(b"NOTANIDX\x00")


def _negative_first_length(prefix):
    with open(prefix + ".idx", "r+b") as stream:
        stream.seek(34)  # the first int32 sequence length, after the 34-byte header
        stream.write((-5).to_bytes(4, "little", signed=True))


CASES = {
    "odd weight/prefix tokens": (lambda prefix, tmp: ["--data-path", f"0.3 {prefix} 0.7"], "needs WEIGHT PREFIX pairs"),
    "negative weight": (lambda prefix, tmp: ["--data-path", f"-1 {prefix} 2 {prefix}"], "must be a positive number"),
    "bad split": (lambda prefix, tmp: ["--data-path", prefix, "--split", "98,2"], "must be three non-negative numbers"),
    "missing .bin": (
        lambda prefix, tmp: ["--data-path", _damaged_copy(prefix, tmp, lambda p: os.remove(p + ".bin"))],
        r"missing .*damaged\.bin",
    ),
    "wrong magic": (
        lambda prefix, tmp: ["--data-path", _damaged_copy(prefix, tmp, _wrong_magic)],
        "is not a Megatron .idx file",
    ),
    "negative sequence length in the .idx": (
        lambda prefix, tmp: ["--data-path", _damaged_copy(prefix, tmp, _negative_first_length)],
        r"damaged\.idx is corrupt: sequence 0 has a negative length \(-5\)",
    ),
    "token ids beyond the model's vocabulary": (
        lambda prefix, tmp: ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"],
        r"dataset .*tiny holds token id 50256 \(ids range from 7 to 50256\), outside the model's vocabulary of 1024",
    ),
    "sequence too long for the data": (
        lambda prefix, tmp: ["--data-path", prefix, "--split", "1,0,0"],
        "fewer than the 33 one sample of sequence length 32 reads",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_input_exits_with_one_line(case, tiny_prefix, tmp_path):
    require_data_pipeline()
    make_flags, message = CASES[case]
    flags = training_flags(tiny_prefix, "mcore", "--train-iters", "4", "--data-cache-path", tmp_path / "cache")
    position = flags.index("--data-path")
    del flags[position : position + 4]  # replace the default --data-path PREFIX --split 98,1,1
    result = run_pretrain([*flags, *make_flags(tiny_prefix, tmp_path)], timeout=120)
    assert result.returncode != 0
    error_lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert re.search(message, error_lines[0]), error_lines[0]
    assert " iteration " not in result.stdout


def test_per_split_and_size_weighted_blends_train(tmp_path):
    """--train-data-path in the weighted form and --valid-data-path in the prefix form, through pretrain_gpt.py."""
    require_data_pipeline()
    from tests.functional_tests.training_runs import gpt2_dataset

    prefix = gpt2_dataset(tmp_path)
    flags = training_flags(prefix, "mcore", "--train-iters", "3", "--eval-interval", "3", "--eval-iters", "1",
                           "--data-cache-path", tmp_path / "cache")
    position = flags.index("--data-path")
    del flags[position : position + 4]
    flags += ["--train-data-path", f"0.25 {prefix} 0.75 {prefix}", "--valid-data-path", prefix, "--test-data-path", prefix]
    result = run_pretrain(flags, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"train: 24 samples from .*weight 0\.25.*weight 0\.75", result.stdout), result.stdout[-3000:]
    assert re.search(r" iteration\s+3/\s*3 \|", result.stdout)
    assert "validation loss at iteration 3" in result.stdout
