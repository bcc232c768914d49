"""BlendedMegatronDatasetBuilder: splits, both blend forms, per-split blends, config errors."""

import numpy
import pytest

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.utils import DatasetError, get_blend_from_list

from .conftest import gpt_config, recognisable_documents, write_dataset


@pytest.fixture
def prefixes(tmp_path):
    return [
        write_dataset(str(tmp_path / "a"), recognisable_documents(100, seed=1)),
        write_dataset(str(tmp_path / "b"), recognisable_documents(50, seed=2)),
    ]


def build(sizes, tmp_path, **config):
    config = gpt_config(path_to_cache=str(tmp_path / "cache"), **config)
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def test_split_divides_the_documents(prefixes, tmp_path):
    train, valid, test = build([10, 5, 2], tmp_path, blend=(prefixes[:1], None), split="80,15,5")
    assert sorted(set(train.document_index.tolist())) == list(range(0, 80))
    assert sorted(set(valid.document_index.tolist())) == list(range(80, 95))
    assert sorted(set(test.document_index.tolist())) == list(range(95, 100))
    assert (len(train) >= 10, len(valid) >= 5, len(test) >= 2) == (True, True, True)


def test_zero_share_leaves_the_split_empty(prefixes, tmp_path):
    train, valid, test = build([10, 5, 2], tmp_path, blend=(prefixes[:1], None), split="1,0,0")
    assert train is not None and valid is None and test is None


def test_weighted_blend_of_every_split(prefixes, tmp_path):
    blend = get_blend_from_list(["0.3", prefixes[0], "0.7", prefixes[1]])
    train, valid, test = build([200, 20, 10], tmp_path, blend=blend, split="90,5,5")
    for dataset, size in ((train, 200), (valid, 20), (test, 10)):
        assert isinstance(dataset, BlendedDataset) and len(dataset) == size
        assert numpy.bincount(dataset.dataset_index).tolist() == pytest.approx([0.3 * size, 0.7 * size], abs=1)
        # Each member is sized to its share plus the surplus, and the blend never reads past it.
        for member_id, member in enumerate(dataset.datasets):
            assert len(member) >= numpy.ceil(dataset.weights[member_id] * size)


def test_unweighted_blend_weighs_by_size(prefixes, tmp_path):
    blend = get_blend_from_list(prefixes)
    assert blend == (prefixes, None)
    train, _, _ = build([30, 0, 0], tmp_path, blend=blend, split="1,0,0")
    lengths = [len(member) for member in train.datasets]
    assert train.weights == pytest.approx(numpy.array(lengths) / sum(lengths))
    assert numpy.bincount(train.dataset_index).tolist() == pytest.approx(numpy.array(train.weights) * 30, abs=1)


def test_unweighted_blend_past_one_epoch_wraps(prefixes, tmp_path):
    train, _, _ = build([3000, 0, 0], tmp_path, blend=(prefixes, None), split="1,0,0")
    assert len(train) == 3000
    for member_id, member in enumerate(train.datasets):
        assert train.dataset_sample_index[train.dataset_index == member_id].max() < len(member)


def test_per_split_blends(prefixes, tmp_path):
    per_split = [
        get_blend_from_list(["1", prefixes[0], "3", prefixes[1]]),
        get_blend_from_list([prefixes[1]]),
        None,
    ]
    train, valid, test = build([40, 8, 4], tmp_path, blend_per_split=per_split)
    assert isinstance(train, BlendedDataset) and train.weights == pytest.approx([0.25, 0.75])
    assert numpy.bincount(train.dataset_index).tolist() == [10, 30]
    assert isinstance(valid, GPTDataset) and valid.dataset_path == prefixes[1]
    assert sorted(set(valid.document_index.tolist())) == list(range(50))  # the whole dataset, no split
    assert test is None


@pytest.mark.parametrize(
    "tokens, message",
    [
        (["0.3", "A", "0.7"], "needs WEIGHT PREFIX pairs"),
        (["-1", "A", "2", "B"], "weight -1.0 for A must be a positive number"),
        (["0", "A", "0", "B"], "weight 0.0 for A must be a positive number"),
        (["A", "0.5", "B"], "put each weight before its prefix"),
        (["0.5", "A", "B", "C"], "expected a weight before 'C', got 'B'"),
        ([], "is empty"),
    ],
)
def test_bad_blend_lists(tokens, message):
    with pytest.raises(DatasetError, match=message):
        get_blend_from_list(tokens)


@pytest.mark.parametrize("split", ["1,2", "1,2,3,4", "a,b,c", "-1,1,1", "0,0,0", "1,inf,1"])
def test_bad_split(split):
    with pytest.raises(DatasetError, match="must be three non-negative numbers"):
        parse_and_normalize_split(split)


def test_split_matrix():
    assert parse_and_normalize_split("949/50/1") == pytest.approx([0.949, 0.05, 0.001])
    matrix = convert_split_vector_to_split_matrix([0.99, 0.01, 0.0])
    assert matrix[0] == pytest.approx((0.0, 0.99)) and matrix[1] == pytest.approx((0.99, 1.0)) and matrix[2] is None


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(blend=(["A"], None)), "needs a split"),
        (dict(blend=(["A", "B"], [1.0, -2.0]), split="1,1,1"), "must be a positive number"),
        (dict(blend=(["A"], None), blend_per_split=[(["A"], None), None, None]), "not both"),
        (dict(blend_per_split=[(["A"], None), None]), "needs 3 entries"),
        (dict(sequence_length=0), "sequence_length must be a positive integer"),
    ],
)
def test_bad_configs(config, message):
    with pytest.raises(DatasetError, match=message):
        gpt_config(**config)


def test_weighted_blend_needs_a_size(prefixes, tmp_path):
    config = gpt_config(blend=(prefixes, [1.0, 1.0]), split="1,0,0", path_to_cache=str(tmp_path))
    with pytest.raises(DatasetError, match="needs a sample count"):
        BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config)
