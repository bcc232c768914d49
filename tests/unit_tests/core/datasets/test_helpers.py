"""The C++ index builders equal plain NumPy/Python references, on random and extreme inputs."""

import numpy
import pytest

from megatron.core.datasets import helpers


def reference_sample_idx(sizes, document_index, sequence_length, drop_last_partial_sequence, extra_token):
    """Sample i starts at token i x sequence_length of the documents laid end to end (in document_index
    order); its row is (position of the document holding its previous sample's last token, offset)."""
    lengths = numpy.asarray(sizes, dtype=numpy.int64)[document_index]
    starts = numpy.concatenate([[0], numpy.cumsum(lengths)])
    total_tokens = int(starts[-1])
    num_samples = (total_tokens - extra_token) // sequence_length
    if not drop_last_partial_sequence and (total_tokens - extra_token) % sequence_length:
        num_samples += 1
    rows = [(0, 0)]
    for sample in range(1, num_samples + 1):
        start = min(sample * sequence_length, total_tokens - extra_token)
        last_token_before = start + extra_token - 1
        position = int(numpy.searchsorted(starts, last_token_before, side="right")) - 1
        rows.append((position, start - int(starts[position])))
    return numpy.array(rows, dtype=numpy.int64)


def reference_blending(weights, size):
    """Greedy: each sample goes to the dataset lagging its target weight x max(n, 1) the most (lowest on ties)."""
    weights = numpy.asarray(weights, dtype=numpy.float64)
    counts = numpy.zeros(len(weights), dtype=numpy.int64)
    dataset_index = numpy.zeros(size, dtype=numpy.int16)
    dataset_sample_index = numpy.zeros(size, dtype=numpy.int64)
    for sample in range(size):
        chosen = int(numpy.argmax(weights * max(sample, 1) - counts))
        dataset_index[sample] = chosen
        dataset_sample_index[sample] = counts[chosen]
        counts[chosen] += 1
    return dataset_index, dataset_sample_index


def reference_exhaustive_blending(sizes):
    """Greedy by size shares over the datasets not yet spent, until every dataset gave all its samples."""
    sizes = numpy.asarray(sizes, dtype=numpy.int64)
    weights = sizes / sizes.sum()
    counts = numpy.zeros(len(sizes), dtype=numpy.int64)
    dataset_index, dataset_sample_index = [], []
    for sample in range(int(sizes.sum())):
        lag = numpy.where(counts < sizes, weights * max(sample, 1) - counts, -numpy.inf)
        chosen = int(numpy.argmax(lag))
        dataset_index.append(chosen)
        dataset_sample_index.append(counts[chosen])
        counts[chosen] += 1
    return numpy.array(dataset_index, dtype=numpy.int16), numpy.array(dataset_sample_index, dtype=numpy.int64)


def blend(weights, size):
    dataset_index = numpy.zeros(size, dtype=numpy.int16)
    dataset_sample_index = numpy.zeros(size, dtype=numpy.int64)
    helpers.build_blending_indices(dataset_index, dataset_sample_index, numpy.asarray(weights), len(weights), size, False)
    return dataset_index, dataset_sample_index


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("extra_token", [0, 1])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sample_idx_equals_reference(seed, extra_token, drop_last):
    rng = numpy.random.default_rng(seed)
    sizes = rng.integers(1, 60, size=int(rng.integers(1, 30))).astype(numpy.int32)
    num_epochs = int(rng.integers(1, 4))
    document_index = numpy.tile(numpy.arange(len(sizes), dtype=numpy.int32), num_epochs)
    rng.shuffle(document_index)
    tokens_per_epoch = int(sizes.sum())
    sequence_length = int(rng.integers(1, 40))
    expected = reference_sample_idx(sizes, document_index, sequence_length, drop_last, extra_token)
    for builder in (helpers.helpers_cpp.build_sample_idx_int32, helpers.helpers_cpp.build_sample_idx_int64):
        built = builder(sizes, document_index, sequence_length, num_epochs, tokens_per_epoch, drop_last, extra_token)
        numpy.testing.assert_array_equal(built, expected)
    wrapped = helpers.build_sample_idx(
        sizes, document_index, sequence_length, num_epochs, tokens_per_epoch, drop_last, bool(extra_token)
    )
    assert wrapped.dtype == numpy.int32
    numpy.testing.assert_array_equal(wrapped, expected)


def test_sample_idx_skips_empty_documents():
    sizes = numpy.array([5, 0, 0, 7, 0, 4], dtype=numpy.int32)
    document_index = numpy.arange(6, dtype=numpy.int32)
    built = helpers.build_sample_idx(sizes, document_index, 3, 1, 16, True, True)
    numpy.testing.assert_array_equal(built, reference_sample_idx(sizes, document_index, 3, True, 1))
    assert built.tolist() == [[0, 0], [0, 3], [3, 1], [3, 4], [5, 0], [5, 3]]


def test_sample_idx_counts_tokens_past_int32():
    """An epoch of over 2**32 tokens: the token arithmetic is 64-bit in both builders."""
    sizes = numpy.array([2**31 - 1, 2**31 - 1, 5], dtype=numpy.int32)
    document_index = numpy.array([0, 1, 2], dtype=numpy.int32)
    expected = reference_sample_idx(sizes, document_index, 2**30, True, 1)
    assert expected[-1].tolist() == [2, 2]  # sample 4 starts at 2**32 = (2**31 - 1) + (2**31 - 1) + 2
    for builder in (helpers.helpers_cpp.build_sample_idx_int32, helpers.helpers_cpp.build_sample_idx_int64):
        numpy.testing.assert_array_equal(builder(sizes, document_index, 2**30, 1, 2**32 + 3, True, 1), expected)


@pytest.mark.parametrize("seed", range(10))
def test_blending_equals_reference_and_stays_within_one_sample(seed):
    rng = numpy.random.default_rng(seed)
    num_datasets = int(rng.integers(1, 8))
    weights = rng.random(num_datasets) + 1e-3
    weights /= weights.sum()
    size = int(rng.integers(1, 3000))
    dataset_index, dataset_sample_index = blend(weights, size)
    expected_index, expected_sample_index = reference_blending(weights, size)
    numpy.testing.assert_array_equal(dataset_index, expected_index)
    numpy.testing.assert_array_equal(dataset_sample_index, expected_sample_index)
    assert_prefix_shares_within_one_sample(dataset_index, weights)


def assert_prefix_shares_within_one_sample(dataset_index, weights):
    """After every prefix of n samples, each dataset's count is within 1 of weight x (n - 1), hence within
    1 + weight of weight x n: Megatron's greedy aims each pick at the share of the samples before it (this
    order is kept so that runs resumed from Megatron-LM read the same blend)."""
    n = numpy.arange(1, len(dataset_index) + 1)
    for dataset, weight in enumerate(weights):
        counts = numpy.cumsum(dataset_index == dataset)
        assert numpy.abs(counts - weight * (n - 1)).max() <= 1.0 + 1e-9, f"dataset {dataset} strays from its share"
        assert numpy.abs(counts - weight * n).max() <= 1.0 + weight + 1e-9


@pytest.mark.parametrize("weights", [[1e-6, 1.0], [1.0, 1e-6], [1e-6, 0.5, 0.5], [1e-9, 1e-9, 1.0]])
def test_extreme_weights_blend_within_one_sample_and_in_range(weights):
    weights = numpy.array(weights) / numpy.sum(weights)
    size = 20000
    dataset_index, dataset_sample_index = blend(weights, size)
    expected_index, expected_sample_index = reference_blending(weights, size)
    numpy.testing.assert_array_equal(dataset_index, expected_index)
    numpy.testing.assert_array_equal(dataset_sample_index, expected_sample_index)
    assert_prefix_shares_within_one_sample(dataset_index, weights)
    # The samples asked of each dataset never exceed its share rounded up plus one (what the builder sizes it to).
    drawn = numpy.bincount(dataset_index, minlength=len(weights))
    assert numpy.all(drawn <= numpy.ceil(weights * size) + 1)
    for dataset in range(len(weights)):
        assert dataset_sample_index[dataset_index == dataset].tolist() == list(range(drawn[dataset]))


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_blending_equals_reference_and_spends_every_dataset(seed):
    rng = numpy.random.default_rng(seed)
    sizes = rng.integers(0, 300, size=int(rng.integers(1, 6)))
    sizes[0] = max(sizes[0], 1)
    total = int(sizes.sum())
    dataset_index = numpy.zeros(total, dtype=numpy.int16)
    dataset_sample_index = numpy.zeros(total, dtype=numpy.int64)
    helpers.build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, len(sizes))
    expected_index, expected_sample_index = reference_exhaustive_blending(sizes)
    numpy.testing.assert_array_equal(dataset_index, expected_index)
    numpy.testing.assert_array_equal(dataset_sample_index, expected_sample_index)
    assert numpy.bincount(dataset_index, minlength=len(sizes)).tolist() == sizes.tolist()


def test_blending_rejects_outputs_of_the_wrong_size_or_dtype():
    with pytest.raises(ValueError, match="at least 10 entries"):
        helpers.build_blending_indices(
            numpy.zeros(5, numpy.int16), numpy.zeros(10, numpy.int64), numpy.array([0.5, 0.5]), 2, 10, False
        )
    with pytest.raises(TypeError):
        helpers.build_blending_indices(
            numpy.zeros(10, numpy.int32), numpy.zeros(10, numpy.int64), numpy.array([0.5, 0.5]), 2, 10, False
        )
    with pytest.raises(ValueError, match="1 weights for 2 datasets"):
        helpers.build_blending_indices(
            numpy.zeros(10, numpy.int16), numpy.zeros(10, numpy.int64), numpy.array([1.0]), 2, 10, False
        )


def test_helpers_match_the_published_megatron_core(run_reference_megatron, tmp_path):
    """Same sample index and blend as megatron-core 0.16.1 (users resuming a run get the same order)."""
    rng = numpy.random.default_rng(7)
    sizes = rng.integers(1, 90, size=40).astype(numpy.int32)
    document_index = numpy.tile(numpy.arange(40, dtype=numpy.int32), 3)
    rng.shuffle(document_index)
    weights = numpy.array([0.2, 1e-4, 0.5, 0.2999])
    numpy.save(tmp_path / "sizes.npy", sizes)
    numpy.save(tmp_path / "document_index.npy", document_index)
    numpy.save(tmp_path / "weights.npy", weights)
    run_reference_megatron(
        f"""
import numpy
from megatron.core.datasets import helpers
d = {str(tmp_path)!r}
sizes, document_index, weights = (numpy.load(f"{{d}}/{{n}}.npy") for n in ("sizes", "document_index", "weights"))
numpy.save(f"{{d}}/ref_sample_idx.npy", helpers.build_sample_idx(sizes, document_index, 17, 3, int(sizes.sum()), False, True))
dataset_index = numpy.zeros(5000, dtype=numpy.int16)
dataset_sample_index = numpy.zeros(5000, dtype=numpy.int64)
helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, 4, 5000, False)
numpy.save(f"{{d}}/ref_dataset_index.npy", dataset_index)
numpy.save(f"{{d}}/ref_dataset_sample_index.npy", dataset_sample_index)
"""
    )
    ours = helpers.build_sample_idx(sizes, document_index, 17, 3, int(sizes.sum()), False, True)
    numpy.testing.assert_array_equal(ours, numpy.load(tmp_path / "ref_sample_idx.npy"))
    dataset_index, dataset_sample_index = blend(weights, 5000)
    numpy.testing.assert_array_equal(dataset_index, numpy.load(tmp_path / "ref_dataset_index.npy"))
    numpy.testing.assert_array_equal(dataset_sample_index, numpy.load(tmp_path / "ref_dataset_sample_index.npy"))
