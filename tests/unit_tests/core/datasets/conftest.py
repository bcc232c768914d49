"""Tiny .bin/.idx datasets with recognisable tokens, and GPT dataset configs over them."""

import types

import numpy
import pytest

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

EOD = 0


def recognisable_documents(num_documents, seed=0, low=1, high=25):
    """Document d holds d * 1000 + 1, d * 1000 + 2, ... then EOD, so every token says where it came from."""
    lengths = numpy.random.default_rng(seed).integers(low, high, size=num_documents)
    return [list(range(d * 1000 + 1, d * 1000 + length)) + [EOD] for d, length in enumerate(lengths)]


def write_dataset(prefix, documents, dtype=numpy.int32):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_document(document, [len(document)])
    builder.finalize(prefix + ".idx")
    return prefix


def tokenizer():
    return types.SimpleNamespace(eod=EOD, pad=None, vocab_size=1 << 20)


def gpt_config(**overrides):
    fields = dict(random_seed=1234, sequence_length=16, tokenizer=tokenizer())
    fields.update(overrides)
    return GPTDatasetConfig(**fields)


@pytest.fixture
def documents():
    return recognisable_documents(60)


@pytest.fixture
def dataset_prefix(tmp_path, documents):
    return write_dataset(str(tmp_path / "corpus"), documents)
