"""BlendedDataset: samples come from the member the blend index names, shares follow weights, indices cache."""

import os

import numpy
import pytest
import torch

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.utils import DatasetError

from .conftest import EOD, gpt_config, recognisable_documents, write_dataset
from tests.conftest import free_port


@pytest.fixture
def two_prefixes(tmp_path):
    return [
        write_dataset(str(tmp_path / "a"), recognisable_documents(40, seed=1)),
        write_dataset(str(tmp_path / "b"), recognisable_documents(25, seed=2)),
    ]


def build_blend(prefixes, weights, size, cache):
    config = gpt_config(blend=(prefixes, weights), split="1,0,0", path_to_cache=cache)
    return BlendedMegatronDatasetBuilder(GPTDataset, [size, None, None], lambda: True, config).build()[0]


def test_renormalized_blend_weighs_the_samples_each_dataset_was_built_with(two_prefixes, tmp_path):
    config = gpt_config(blend=(two_prefixes, [0.25, 0.75]), split="1,0,0", path_to_cache=str(tmp_path / "cache"),
                        renormalize_blend_weights=True)
    blend = BlendedMegatronDatasetBuilder(GPTDataset, [150, None, None], lambda: True, config).build()[0]
    # asked of the datasets: shares ceil(37.5) = 38 and ceil(112.5) = 113, plus 0.5% surplus rounded up
    assert blend.weights == pytest.approx([39 / 153, 114 / 153])
    assert build_blend(two_prefixes, [0.25, 0.75], 150, str(tmp_path / "plain")).weights == pytest.approx([0.25, 0.75])


def test_blend_reads_each_sample_from_its_member(two_prefixes, tmp_path):
    blend = build_blend(two_prefixes, [0.3, 0.7], 60, str(tmp_path / "cache"))
    assert isinstance(blend, BlendedDataset) and len(blend) == 60
    assert blend.weights == pytest.approx([0.3, 0.7])
    for idx in range(len(blend)):
        sample = blend[idx]
        member = blend.datasets[sample["dataset_id"]]
        expected = member[int(blend.dataset_sample_index[idx])]
        assert sample["dataset_id"] == blend.dataset_index[idx]
        assert torch.equal(sample["tokens"], expected["tokens"])
        assert torch.equal(sample["labels"], expected["labels"])
    counts = numpy.cumsum(numpy.eye(2, dtype=int)[blend.dataset_index], axis=0)
    n = numpy.arange(1, 61)[:, None]
    assert numpy.abs(counts - numpy.array([0.3, 0.7]) * (n - 1)).max() <= 1.0 + 1e-9


def test_member_far_smaller_than_its_share_wraps_instead_of_running_out(two_prefixes, tmp_path):
    """Dataset b holds about 20 samples per epoch but is asked for 0.9 x 400: it wraps into more epochs."""
    blend = build_blend(two_prefixes, [0.1, 0.9], 400, str(tmp_path / "cache"))
    small = blend.datasets[1]
    drawn = numpy.bincount(blend.dataset_index, minlength=2)
    assert drawn[1] >= 359 and len(small) >= drawn[1]
    assert small.document_index.shape[0] > 5 * 25  # many epochs of its 25 documents
    assert blend.dataset_sample_index[blend.dataset_index == 1].max() < len(small)
    assert blend[int(numpy.flatnonzero(blend.dataset_index == 1)[-1])]["tokens"].shape == (16,)


def test_extreme_weight_blend_stays_in_range(two_prefixes, tmp_path):
    blend = build_blend(two_prefixes, [1e-6, 1.0], 500, str(tmp_path / "cache"))
    for member_id, member in enumerate(blend.datasets):
        drawn = blend.dataset_sample_index[blend.dataset_index == member_id]
        assert drawn.size == 0 or drawn.max() < len(member)
    assert blend[len(blend) - 1]["tokens"].shape == (16,)


def test_blend_indices_are_cached(two_prefixes, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = build_blend(two_prefixes, [0.3, 0.7], 60, cache)
    names = sorted(os.listdir(cache))
    assert sum(name.startswith(first.unique_description_hash) for name in names) == 3  # two arrays + description
    monkeypatch.setattr(BlendedDataset, "_build_blend", lambda self: pytest.fail("the blend must load from the cache"))
    second = build_blend(two_prefixes, [0.3, 0.7], 60, cache)
    numpy.testing.assert_array_equal(first.dataset_index, second.dataset_index)
    assert sorted(os.listdir(cache)) == names


def test_oversampled_member_is_refused(two_prefixes, tmp_path):
    member = build_blend(two_prefixes[:1], None, 10, str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match=r"draws 100 samples from dataset 0 .* which holds"):
        BlendedDataset([member], [1.0], 100, member.config)


def test_blend_matches_the_published_megatron_core(two_prefixes, tmp_path, run_reference_megatron):
    ours = build_blend(two_prefixes, [0.25, 0.75], 150, str(tmp_path / "ours"))
    reference_cache = tmp_path / "reference"
    run_reference_megatron(
        f"""
import types, torch
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
tokenizer = types.SimpleNamespace(eod={EOD}, pad=-1, eos=None, bos=None, vocab_size=1 << 20, unique_identifiers={{}})
config = GPTDatasetConfig(random_seed=1234, sequence_length=16, blend=({two_prefixes!r}, [0.25, 0.75]), split="1,0,0",
    path_to_cache={str(reference_cache)!r}, tokenizer=tokenizer, reset_position_ids=False,
    reset_attention_mask=False, eod_mask_loss=False)
BlendedMegatronDatasetBuilder(GPTDataset, [150, 0, 0], lambda: True, config).build()
"""
    )
    (dataset_index,) = reference_cache.glob("*BlendedDataset*-dataset_index.npy")
    (sample_index,) = reference_cache.glob("*BlendedDataset*-dataset_sample_index.npy")
    numpy.testing.assert_array_equal(ours.dataset_index, numpy.load(dataset_index))
    numpy.testing.assert_array_equal(ours.dataset_sample_index, numpy.load(sample_index))
    reference_shuffles = sorted(reference_cache.glob("*GPTDataset*-shuffle_index.npy"), key=lambda p: len(numpy.load(p)))
    ours_shuffles = sorted((member.shuffle_index for member in ours.datasets), key=len)
    for mine, path in zip(ours_shuffles, reference_shuffles):
        numpy.testing.assert_array_equal(mine, numpy.load(path))
