"""GPTDataset: samples are the right slices of the .bin, epochs wrap, the seed fixes the order, indices cache."""

import contextlib
import json
import os

import numpy
import pytest
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset, _get_ltor_masks_and_position_ids
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError
from megatron.core.datasets.utils import DatasetError

from .conftest import EOD, gpt_config, recognisable_documents, write_dataset


def build_train(prefix, num_samples, **config):
    config = gpt_config(blend=([prefix], None), split="1,0,0", **config)
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    assert valid is None and test is None
    return train


def token_stream(documents, document_index):
    return numpy.concatenate([documents[d] for d in document_index])


def assert_samples_are_slices_of_the_stream(dataset, documents):
    """Sample i is tokens [s * L, s * L + L + 1) of the documents laid out in document-index order, s = shuffle[i]."""
    stream = token_stream(documents, dataset.document_index)
    length = dataset.config.sequence_length
    for idx in range(len(dataset)):
        start = int(dataset.shuffle_index[idx]) * length
        expected = torch.from_numpy(stream[start : start + length + 1].astype(numpy.int64))
        sample = dataset[idx]
        assert torch.equal(sample["tokens"], expected[:-1])
        assert torch.equal(sample["labels"], expected[1:])


def test_samples_are_the_bin_slices_across_document_boundaries(dataset_prefix, documents, tmp_path):
    dataset = build_train(dataset_prefix, 20, path_to_cache=str(tmp_path / "cache"))
    tokens_per_epoch = sum(len(document) for document in documents)
    assert len(dataset) == (tokens_per_epoch - 1) // 16  # one epoch covers 20 samples: no wrap
    assert sorted(dataset.document_index.tolist()) == list(range(60))
    assert sorted(dataset.shuffle_index.tolist()) == list(range(len(dataset)))
    assert_samples_are_slices_of_the_stream(dataset, documents)
    documents_per_sample = [len({token // 1000 for token in dataset[i]["tokens"].tolist()}) for i in range(len(dataset))]
    assert max(documents_per_sample) > 2, "the documents are short: samples must cross document boundaries"
    sample = dataset[0]
    assert set(sample) == {"tokens", "labels", "attention_mask", "loss_mask", "position_ids"}
    assert torch.equal(sample["position_ids"], torch.arange(16))
    assert torch.equal(sample["loss_mask"], torch.ones(16))
    assert torch.equal(sample["attention_mask"][0], ~torch.ones(16, 16, dtype=torch.bool).tril())


def test_epochs_wrap_when_more_samples_are_asked(dataset_prefix, documents, tmp_path):
    one_epoch = (sum(len(document) for document in documents) - 1) // 16
    dataset = build_train(dataset_prefix, 3 * one_epoch + 5, path_to_cache=str(tmp_path / "cache"))
    assert len(dataset) >= 3 * one_epoch + 5
    assert numpy.bincount(dataset.document_index).tolist() == [4] * 60  # four epochs of every document
    assert dataset.sample_index.dtype == numpy.int32
    assert_samples_are_slices_of_the_stream(dataset, documents)


def test_same_seed_same_order_other_seed_other_order(dataset_prefix, tmp_path):
    first = build_train(dataset_prefix, 20, path_to_cache=str(tmp_path / "a"))
    again = build_train(dataset_prefix, 20, path_to_cache=str(tmp_path / "b"))
    other = build_train(dataset_prefix, 20, path_to_cache=str(tmp_path / "c"), random_seed=99)
    for name in ("document_index", "sample_index", "shuffle_index"):
        numpy.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not numpy.array_equal(first.shuffle_index, other.shuffle_index)
    assert not numpy.array_equal(first.document_index, other.document_index)
    assert [first[i]["tokens"].tolist() for i in range(5)] == [again[i]["tokens"].tolist() for i in range(5)]


def cache_files(directory):
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in sorted(os.listdir(directory))}


def test_cache_is_reused_and_invalidated_by_a_changed_parameter(dataset_prefix, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = build_train(dataset_prefix, 20, path_to_cache=cache)
    written = cache_files(cache)
    assert len(written) == 4 and not any(name.endswith(".tmp") for name in written)
    description = next(name for name in written if name.endswith("description.txt"))
    assert json.load(open(os.path.join(cache, description)))["random_seed"] == 1234

    def must_not_build(self):
        raise AssertionError("the indices are cached: they must be loaded, not rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(GPTDataset, "_build_indices", must_not_build)
        second = build_train(dataset_prefix, 20, path_to_cache=cache)
    assert cache_files(cache) == written
    assert isinstance(second.shuffle_index, numpy.memmap)
    numpy.testing.assert_array_equal(first.shuffle_index, second.shuffle_index)

    built = []
    original = GPTDataset._build_indices
    monkeypatch.setattr(GPTDataset, "_build_indices", lambda self: built.append(1) or original(self))
    longer = build_train(dataset_prefix, 20, path_to_cache=cache, sequence_length=20)
    assert built == [1]
    assert len(cache_files(cache)) == 8
    assert len(longer[0]["tokens"]) == 20


def test_default_cache_is_beside_the_data(dataset_prefix):
    build_train(dataset_prefix, 10, vocab_size=60000)
    folder = os.path.join(dataset_prefix, "cache", "GPTDataset_indices")
    assert sorted(name.split("-", 1)[1] for name in os.listdir(folder)) == [
        "GPTDataset-train-description.txt",
        "GPTDataset-train-document_index.npy",
        "GPTDataset-train-sample_index.npy",
        "GPTDataset-train-shuffle_index.npy",
        "IndexedDataset-description.txt",
        "IndexedDataset-token_id_range.npy",
    ]


def test_rewritten_dataset_under_the_same_prefix_gets_fresh_indices(tmp_path):
    """Same prefix, same sequence count and .bin size, other document lengths: the cached indices must not be
    reused (they would cut samples at the old boundaries)."""
    cache = str(tmp_path / "cache")
    first_documents = recognisable_documents(60, seed=0)
    prefix = write_dataset(str(tmp_path / "corpus"), first_documents)
    assert_samples_are_slices_of_the_stream(build_train(prefix, 20, path_to_cache=cache), first_documents)

    lengths = [len(document) for document in first_documents]
    rewritten = [list(range(d * 1000 + 1, d * 1000 + length)) + [EOD] for d, length in enumerate(lengths[::-1])]
    assert lengths != lengths[::-1]
    write_dataset(prefix, rewritten)
    assert_samples_are_slices_of_the_stream(build_train(prefix, 20, path_to_cache=cache), rewritten)


@pytest.mark.parametrize("vocab_size, refused", [(59015, True), (59016, False)])
def test_token_ids_beyond_the_vocabulary_are_refused_once_scanned(dataset_prefix, documents, tmp_path, monkeypatch, vocab_size, refused):
    assert max(max(document) for document in documents) == 59015
    message = rf"dataset .*corpus holds token id 59015 \(ids range from 0 to 59015\), outside the model's vocabulary of {vocab_size}; "
    for _ in range(2):  # the first build scans the .bin, the second must read the cached range
        with pytest.raises(DatasetError, match=message) if refused else contextlib.nullcontext():
            build_train(dataset_prefix, 20, path_to_cache=str(tmp_path / "cache"), vocab_size=vocab_size)
        monkeypatch.setattr(IndexedDataset, "token_id_range", lambda self: pytest.fail("the .bin was scanned twice"))


def test_negative_token_ids_are_refused(tmp_path):
    prefix = write_dataset(str(tmp_path / "signed"), [[5, -3, EOD]] * 20)
    with pytest.raises(DatasetError, match=r"holds token id -3 \(ids range from -3 to 5\)"):
        build_train(prefix, 2, path_to_cache=str(tmp_path / "cache"), vocab_size=100, sequence_length=4)


def reference_masks(tokens, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Loop version: positions restart and attention stops after each EOD; EOD optionally out of the loss."""
    length = len(tokens)
    position_ids, allowed = list(range(length)), numpy.tril(numpy.ones((length, length), dtype=bool))
    loss_mask = [0.0 if eod_mask_loss and token == EOD else 1.0 for token in tokens]
    for i, token in enumerate(tokens):
        if token != EOD:
            continue
        if reset_attention_mask:
            allowed[i + 1 :, : i + 1] = False
        if reset_position_ids:
            position_ids[i + 1 :] = range(length - i - 1)
    return position_ids, ~allowed, loss_mask


@pytest.mark.parametrize("resets", [(True, True, True), (True, False, False), (False, True, True)])
def test_masks_and_position_ids_follow_eod_tokens(resets):
    tokens = torch.tensor([5, 6, EOD, 7, 8, 9, EOD, EOD, 3, 4])
    attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(tokens, EOD, *resets, True)
    expected_positions, expected_mask, expected_loss = reference_masks(tokens.tolist(), *resets)
    assert position_ids.tolist() == expected_positions
    assert torch.equal(attention_mask[0], torch.from_numpy(expected_mask))
    assert loss_mask.tolist() == expected_loss


def test_sequence_length_too_long_for_a_tiny_dataset(tmp_path):
    prefix = write_dataset(str(tmp_path / "tiny"), [[1, 2, EOD], [3, EOD]])
    with pytest.raises(DatasetError, match=r"holds 2 documents with 5 tokens, fewer than the 17 .*--seq-length"):
        build_train(prefix, 4, path_to_cache=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda prefix: os.remove(prefix + ".bin"), r"missing .*\.bin"),
        (lambda prefix: os.remove(prefix + ".idx"), r"missing .*\.idx"),
        (lambda prefix: os.truncate(prefix + ".bin", 40), r"\.bin is truncated"),
        (lambda prefix: os.truncate(prefix + ".idx", 60), r"\.idx is truncated"),
        (lambda prefix: _overwrite(prefix + ".idx", 0, b"NOTMMIDX\x00"), "not a Megatron .idx file"),
        (lambda prefix: _overwrite(prefix + ".idx", 9, (2).to_bytes(8, "little")), "index version 2"),
    ],
)
def test_damaged_files_give_a_clear_message(dataset_prefix, tmp_path, damage, message):
    damage(dataset_prefix)
    with pytest.raises(IndexedDatasetError, match=message):
        build_train(dataset_prefix, 4, path_to_cache=str(tmp_path / "cache"))


def _overwrite(path, offset, data):
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(data)


def test_mock_dataset_builds_without_files():
    config = gpt_config(sequence_length=32)
    assert config.mock
    train, valid, test = BlendedMegatronDatasetBuilder(MockGPTDataset, [8, 4, 2], lambda: True, config).build()
    assert (len(train) >= 8, len(valid) >= 4, len(test) >= 2) == (True, True, True)
    assert train[0]["tokens"].shape == (32,)
    assert torch.equal(train[0]["tokens"][1:], train[0]["labels"][:-1])


def test_indices_match_the_published_megatron_core(dataset_prefix, tmp_path, run_reference_megatron):
    """Same document, sample and shuffle indices as megatron-core 0.16.1, so resumed runs read the same data."""
    ours = build_train(dataset_prefix, 50, path_to_cache=str(tmp_path / "ours"))
    reference_cache = tmp_path / "reference"
    run_reference_megatron(
        f"""
import types
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
tokenizer = types.SimpleNamespace(eod={EOD}, pad=-1, eos=None, bos=None, vocab_size=1 << 20, unique_identifiers={{}})
config = GPTDatasetConfig(random_seed=1234, sequence_length=16, blend=([{dataset_prefix!r}], None), split="1,0,0",
    path_to_cache={str(reference_cache)!r}, tokenizer=tokenizer, reset_position_ids=False,
    reset_attention_mask=False, eod_mask_loss=False)
BlendedMegatronDatasetBuilder(GPTDataset, [50, None, None], lambda: True, config).build()
"""
    )
    for name in ("document_index", "sample_index", "shuffle_index"):
        (path,) = [path for path in reference_cache.rglob(f"*-{name}.npy")]
        numpy.testing.assert_array_equal(getattr(ours, name), numpy.load(path), err_msg=name)
