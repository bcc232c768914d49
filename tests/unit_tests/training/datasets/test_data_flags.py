"""Data flags: both --data-path forms, per-split blends, sample counts, and the datasets provider."""

import types

import numpy
import pytest

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.training import datasets as provider_module
from megatron.training.arguments import ArgumentsError, parse_args, validate_args
from megatron.training.datasets import core_gpt_dataset_config_from_args, train_valid_test_datasets_provider
from megatron.training.datasets.utils import get_train_valid_test_num_samples
from megatron.training.model_config import get_blend_and_blend_per_split

MODEL = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--max-position-embeddings", "8"]
BASE = ["--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--device", "cpu", "--seq-length", "8", *MODEL]


def validated(*flags):
    return validate_args(parse_args(args_list=[*BASE, *flags]))


def test_weighted_data_path_unquoted_and_quoted():
    for flags in (["--data-path", "0.3", "A", "0.7", "B"], ["--data-path", "0.3 A 0.7 B"]):
        args = validated(*flags)
        assert get_blend_and_blend_per_split(args) == ((["A", "B"], [0.3, 0.7]), None)
        assert args.split == "969, 30, 1"  # Megatron-LM's default split


def test_prefix_only_data_path_weighs_by_size():
    args = validated("--data-path", "A", "B", "--split", "98,1,1")
    assert get_blend_and_blend_per_split(args) == ((["A", "B"], None), None)


def test_per_split_data_paths():
    args = validated("--train-data-path", "1", "A", "3", "B", "--valid-data-path", "C")
    assert get_blend_and_blend_per_split(args) == (None, [(["A", "B"], [1.0, 3.0]), (["C"], None), None])


def test_per_split_data_args_file(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text('{"train": "0.5 A 0.5 B", "test": ["C"]}')
    args = validated("--per-split-data-args-path", str(path))
    assert get_blend_and_blend_per_split(args) == (None, [(["A", "B"], [0.5, 0.5]), None, (["C"], None)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data-path", "0.3", "A", "0.7"], "needs WEIGHT PREFIX pairs"),
        (["--data-path", "-0.3", "A", "0.7", "B"], "weight -0.3 for A must be a positive number"),
        (["--data-path", "0", "A", "0", "B"], "must be a positive number"),
        (["--data-path", "A", "--split", "90,10"], "must be three non-negative numbers"),
        (["--data-path", "A", "--split", "90,-10,0"], "must be three non-negative numbers"),
        (["--data-path", "A", "--mock-data"], "give one data source, not --mock-data and --data-path"),
        (["--train-data-path", "A", "--split", "1,1,1"], "per-split blends .* need no --split"),
    ],
)
def test_bad_data_flags(flags, message):
    with pytest.raises(ArgumentsError, match=message):
        validated(*flags)


def test_sample_counts_follow_iterations_and_evaluation():
    args = validated("--mock-data", "--global-batch-size", "4", "--eval-interval", "3", "--eval-iters", "2")
    assert get_train_valid_test_num_samples(args) == (10 * 4, (10 // 3 + 1) * 2 * 4, 2 * 4)
    args.train_samples = 123
    assert get_train_valid_test_num_samples(args)[0] == 123


def write_dataset(prefix, num_documents, seed):
    lengths = numpy.random.default_rng(seed).integers(2, 20, size=num_documents)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for length in lengths:
        builder.add_document(list(range(1, length)) + [0], [int(length)])
    builder.finalize(prefix + ".idx")
    return prefix


def test_provider_builds_the_blend_of_the_flags(tmp_path, monkeypatch):
    a, b = write_dataset(str(tmp_path / "a"), 80, 1), write_dataset(str(tmp_path / "b"), 40, 2)
    args = validated(
        "--data-path", f"0.25 {a} 0.75 {b}", "--split", "90,10,0", "--data-cache-path", str(tmp_path / "cache"),
        "--eod-mask-loss", "--no-create-attention-mask-in-dataloader",
    )
    tokenizer = types.SimpleNamespace(eod=0, pad=None, vocab_size=100)
    config = core_gpt_dataset_config_from_args(args, tokenizer)
    assert (config.split, config.eod_mask_loss, config.create_attention_mask) == ("90,10,0", True, False)
    monkeypatch.setattr(provider_module, "get_args", lambda: args)
    monkeypatch.setattr(provider_module, "get_tokenizer", lambda: tokenizer)
    train, valid, test = train_valid_test_datasets_provider([40, 8, 0])
    assert isinstance(train, BlendedDataset) and len(train) == 40 and numpy.bincount(train.dataset_index).tolist() == [10, 30]
    assert isinstance(valid, BlendedDataset) and len(valid) == 8 and test is None
    sample = train[0]
    assert "attention_mask" not in sample and sample["tokens"].shape == (8,)
    assert (sample["loss_mask"] == (sample["tokens"] != 0)).all()  # --eod-mask-loss
    assert all(isinstance(member, GPTDataset) for member in train.datasets)
    assert sorted((tmp_path / "cache").iterdir())  # the indices went to --data-cache-path
