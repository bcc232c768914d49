"""The .bin/.idx writer and reader: exact bytes, round trips, Megatron interop and clear failures."""

import errno
import json
import os
import struct

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    merge_datasets,
)

DOCUMENTS = [[5, 6, 7], [], [1], list(range(40000, 40100)), [], [9, 9]]


def write_dataset(prefix, documents, dtype=numpy.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for document in documents:
        builder.add_document(document, [len(document)] if document else [])
    builder.finalize(prefix + ".idx")


def test_header_and_layout_bytes(tmp_path):
    prefix = str(tmp_path / "tiny")
    write_dataset(prefix, [[1, 2, 3], [4]])
    idx = open(prefix + ".idx", "rb").read()
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", 8)  # uint16
        + struct.pack("<Q", 2)  # sequences
        + struct.pack("<Q", 3)  # document indices (documents + 1)
        + struct.pack("<2i", 3, 1)
        + struct.pack("<2q", 0, 6)  # byte offsets: 3 tokens x 2 bytes
        + struct.pack("<3q", 0, 1, 2)
    )
    assert idx == expected
    assert open(prefix + ".bin", "rb").read() == numpy.array([1, 2, 3, 4], dtype="<u2").tobytes()


@pytest.mark.parametrize(
    "vocab_size, dtype", [(None, numpy.int32), (50257, numpy.uint16), (65499, numpy.uint16), (65500, numpy.int32)]
)
def test_dtype_choice(vocab_size, dtype):
    assert DType.optimal_dtype(vocab_size) == dtype


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32, numpy.int64])
def test_round_trip(tmp_path, dtype):
    prefix = str(tmp_path / "data")
    write_dataset(prefix, DOCUMENTS, dtype)
    dataset = IndexedDataset(prefix)
    non_empty = [document for document in DOCUMENTS if document]
    assert len(dataset) == len(non_empty)
    assert dataset.index.dtype == dtype
    assert dataset.sequence_lengths.tolist() == [len(document) for document in non_empty]
    assert dataset.document_indices.tolist() == [0, 1, 1, 2, 3, 3, 4]
    for position, document in enumerate(non_empty):
        assert dataset[position].tolist() == document
    assert dataset.get(2, offset=10, length=5).tolist() == list(range(40010, 40015))
    assert dataset.get(2, offset=95).tolist() == list(range(40095, 40100))
    assert [array.tolist() for array in dataset[0:2]] == non_empty[:2]
    assert dataset.num_tokens == sum(map(len, DOCUMENTS))


def test_sentences_within_documents(tmp_path):
    prefix = str(tmp_path / "sentences")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    builder.add_item([1, 2])
    builder.add_item([3])
    builder.end_document()
    builder.add_document([4, 5, 6], [1, 2])
    builder.finalize(prefix + ".idx")
    dataset = IndexedDataset(prefix)
    assert dataset.sequence_lengths.tolist() == [2, 1, 1, 2]
    assert dataset.document_indices.tolist() == [0, 2, 4]
    assert dataset[3].tolist() == [5, 6]


def test_merge_equals_single_dataset(tmp_path):
    write_dataset(str(tmp_path / "a"), DOCUMENTS[:3])
    write_dataset(str(tmp_path / "b"), DOCUMENTS[3:])
    write_dataset(str(tmp_path / "whole"), DOCUMENTS)
    merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "merged"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == (tmp_path / f"whole{suffix}").read_bytes()


def test_merge_refuses_mixed_dtypes(tmp_path):
    write_dataset(str(tmp_path / "a"), [[1]], numpy.uint16)
    write_dataset(str(tmp_path / "b"), [[1]], numpy.int32)
    with pytest.raises(IndexedDatasetError, match="dtype is int32"):
        merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]


def test_unfinished_builder_leaves_no_dataset(tmp_path):
    prefix = str(tmp_path / "partial")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16) as builder:
            builder.add_document([1, 2], [2])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


class _FileWhoseCloseFails:
    """A data file on a full disk: the data goes out when closing flushes it, and the flush fails."""

    def __init__(self, stream):
        self.stream = stream
        self.write = stream.write

    def close(self):
        self.stream.close()
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("ending", ["finalize", "abort"])
def test_temporary_files_go_even_when_closing_them_fails(tmp_path, ending):
    prefix = str(tmp_path / "full")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    builder.add_document([1, 2, 3], [3])
    builder._data_file = _FileWhoseCloseFails(builder._data_file)
    if ending == "finalize":
        with pytest.raises(OSError, match="No space left on device"):
            builder.finalize(prefix + ".idx")
    else:
        builder.abort()
    assert os.listdir(tmp_path) == []


class TestBadFiles:
    @pytest.fixture
    def prefix(self, tmp_path):
        prefix = str(tmp_path / "data")
        write_dataset(prefix, DOCUMENTS)
        return prefix

    def test_missing_bin(self, prefix):
        os.remove(prefix + ".bin")
        with pytest.raises(IndexedDatasetError, match=r"missing .*data\.bin"):
            IndexedDataset(prefix)

    def test_truncated_bin(self, prefix):
        os.truncate(prefix + ".bin", 10)
        with pytest.raises(IndexedDatasetError, match=r"data\.bin is truncated: 10 bytes"):
            IndexedDataset(prefix)

    @pytest.mark.parametrize("size", [5, 40])
    def test_truncated_idx(self, prefix, size):
        os.truncate(prefix + ".idx", size)
        with pytest.raises(IndexedDatasetError, match=r"data\.idx is truncated"):
            IndexedDataset(prefix)

    def test_wrong_magic(self, prefix):
        with open(prefix + ".idx", "r+b") as stream:
            stream.write(b"TNTIDX\x00\x00\x00")
        with pytest.raises(IndexedDatasetError, match="not a Megatron .idx file"):
            IndexedDataset(prefix)

    @pytest.mark.parametrize(
        "field, sequence, value, message",
        [
            ("lengths", 3, -72000, r"sequence 3 has a negative length \(-72000\)"),
            ("pointers", 2, 4, r"sequence 2 starts at byte 4, inside sequence 1, which ends at byte 8"),
            ("pointers", 0, -2, r"sequence 0 starts at byte -2, before byte 0"),
        ],
    )
    def test_negative_or_overlapping_sequences(self, prefix, field, sequence, value, message):
        _overwrite_index_entry(prefix, field, sequence, value)
        with pytest.raises(IndexedDatasetError, match=r"data\.idx is corrupt: " + message):
            IndexedDataset(prefix)

    def test_sequence_beyond_the_bin(self, prefix):
        _overwrite_index_entry(prefix, "pointers", 3, 10**6)
        with pytest.raises(IndexedDatasetError, match=r"data\.bin is truncated: \d+ bytes, but .*data\.idx describes 1000004"):
            IndexedDataset(prefix)

    def test_wrong_version(self, prefix):
        with open(prefix + ".idx", "r+b") as stream:
            stream.seek(9)
            stream.write(struct.pack("<Q", 2))
        with pytest.raises(IndexedDatasetError, match="index version 2"):
            IndexedDataset(prefix)


def _overwrite_index_entry(prefix, field, sequence, value):
    """Set one sequence length (int32) or pointer (int64) in the .idx in place."""
    count = len(IndexedDataset(prefix))
    header = 9 + 8 + 1 + 8 + 8
    offset, code = (header + 4 * sequence, "<i") if field == "lengths" else (header + 4 * count + 8 * sequence, "<q")
    with open(prefix + ".idx", "r+b") as stream:
        stream.seek(offset)
        stream.write(struct.pack(code, value))


REFERENCE_WRITER = """
import json, numpy, sys
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, DType
documents = json.load(open(sys.argv[1] if len(sys.argv) > 1 else {documents!r}))
builder = IndexedDatasetBuilder({prefix!r} + ".bin", dtype=DType.optimal_dtype({vocab_size}))
for document in documents:
    builder.add_document(document, [len(document)] if document else [])
builder.finalize({prefix!r} + ".idx")
"""

REFERENCE_READER = """
import json
from megatron.core.datasets.indexed_dataset import IndexedDataset
dataset = IndexedDataset({prefix!r})
print(json.dumps({{"sequences": [dataset[i].tolist() for i in range(len(dataset))],
                   "documents": dataset.document_indices.tolist(),
                   "dtype": dataset.index.dtype.__name__}}))
"""


@pytest.mark.parametrize("vocab_size", [50257, 128256])
def test_same_bytes_as_megatron_core_writer(tmp_path, run_reference_megatron, vocab_size):
    documents_path = tmp_path / "documents.json"
    documents_path.write_text(json.dumps(DOCUMENTS))
    reference_prefix = str(tmp_path / "reference")
    run_reference_megatron(
        REFERENCE_WRITER.format(documents=str(documents_path), prefix=reference_prefix, vocab_size=vocab_size)
    )
    ours = str(tmp_path / "ours")
    write_dataset(ours, DOCUMENTS, DType.optimal_dtype(vocab_size))
    for suffix in (".bin", ".idx"):
        assert open(ours + suffix, "rb").read() == open(reference_prefix + suffix, "rb").read()


def test_megatron_core_reads_ours_and_we_read_its(tmp_path, run_reference_megatron):
    ours = str(tmp_path / "ours")
    write_dataset(ours, DOCUMENTS, numpy.int32)
    seen = json.loads(run_reference_megatron(REFERENCE_READER.format(prefix=ours)))
    assert seen == {
        "sequences": [document for document in DOCUMENTS if document],
        "documents": [0, 1, 1, 2, 3, 3, 4],
        "dtype": "int32",
    }

    documents_path = tmp_path / "documents.json"
    documents_path.write_text(json.dumps(DOCUMENTS))
    theirs = str(tmp_path / "theirs")
    run_reference_megatron(REFERENCE_WRITER.format(documents=str(documents_path), prefix=theirs, vocab_size=50257))
    dataset = IndexedDataset(theirs)
    assert [dataset[i].tolist() for i in range(len(dataset))] == [document for document in DOCUMENTS if document]
    assert dataset.document_indices.tolist() == [0, 1, 1, 2, 3, 3, 4]
