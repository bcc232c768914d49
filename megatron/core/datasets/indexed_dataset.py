"""The Megatron indexed dataset: token ids in PREFIX.bin, their layout in PREFIX.idx.

The byte layout is fixed by Megatron-LM (see docs/FORMATS.md) so that datasets move freely between it and
this project. Reading is by numpy memmap, never a full-file load.
"""

import hashlib
import os
import struct
from enum import Enum
from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

import numpy
from megatron.core.errors import UserError

_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_VERSION = 1
# magic, version (uint64), dtype code (uint8), sequence count (uint64), document count (uint64)
_HEADER_SIZE = len(_INDEX_MAGIC) + 8 + 1 + 8 + 8
# Elements per step of the vectorised checks: bounded memory (~100 MB of temporaries) for 10^8 sequences.
_CHUNK = 1 << 23
_CACHE_SIZED_CHUNK = 1 << 18


class DType(Enum):
    """The dtype codes stored in the .idx header."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_from_dtype(cls, dtype) -> int:
        return cls[numpy.dtype(dtype).name].value

    @classmethod
    def dtype_from_code(cls, code: int) -> type:
        return getattr(numpy, cls(code).name)

    @staticmethod
    def optimal_dtype(cardinality: Optional[int]) -> type:
        """uint16 when every token id fits with room to spare (Megatron's 65500 threshold), else int32."""
        if cardinality is not None and cardinality < 65500:
            return numpy.uint16
        return numpy.int32


def get_bin_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def get_idx_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


class IndexedDatasetError(UserError, ValueError):
    """A dataset file that is missing, truncated or not in the Megatron format."""


def _temporary_path(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


def _write_index(idx_path: str, dtype, sequence_lengths, document_indices, sequence_modes=None) -> None:
    """Write a complete .idx file at `idx_path` (the caller handles temporary names)."""
    lengths = numpy.asarray(sequence_lengths, dtype=numpy.int32)
    pointers = numpy.zeros(len(lengths), dtype=numpy.int64)
    if len(lengths) > 1:
        numpy.cumsum(lengths[:-1], dtype=numpy.int64, out=pointers[1:])
    pointers *= numpy.dtype(dtype).itemsize
    documents = numpy.asarray(document_indices, dtype=numpy.int64)
    with open(idx_path, "wb") as stream:
        stream.write(_INDEX_MAGIC)
        stream.write(struct.pack("<Q", _INDEX_VERSION))
        stream.write(struct.pack("<B", DType.code_from_dtype(dtype)))
        stream.write(struct.pack("<Q", len(lengths)))
        stream.write(struct.pack("<Q", len(documents)))
        stream.write(lengths.astype("<i4").tobytes(order="C"))
        stream.write(pointers.astype("<i8").tobytes(order="C"))
        stream.write(documents.astype("<i8").tobytes(order="C"))
        if sequence_modes is not None:
            stream.write(numpy.asarray(sequence_modes, dtype=numpy.int8).tobytes(order="C"))


class _IndexReader:
    """The parsed, memory-mapped .idx file; validates it against its own header and the .bin size."""

    def __init__(self, idx_path: str, multimodal: bool) -> None:
        file_size = os.path.getsize(idx_path)
        if file_size < _HEADER_SIZE:
            raise IndexedDatasetError(
                f"{idx_path} is truncated ({file_size} bytes, the header alone is {_HEADER_SIZE}); "
                "re-run tools/preprocess_data.py to rebuild it"
            )
        with open(idx_path, "rb") as stream:
            magic = stream.read(len(_INDEX_MAGIC))
            if magic != _INDEX_MAGIC:
                raise IndexedDatasetError(
                    f"{idx_path} is not a Megatron .idx file (magic {magic!r}, expected {_INDEX_MAGIC!r}); "
                    "point --data-path at a prefix written by tools/preprocess_data.py"
                )
            (version,) = struct.unpack("<Q", stream.read(8))
            if version != _INDEX_VERSION:
                raise IndexedDatasetError(
                    f"{idx_path} has index version {version}; only version {_INDEX_VERSION} is supported"
                )
            (dtype_code,) = struct.unpack("<B", stream.read(1))
            try:
                self.dtype = DType.dtype_from_code(dtype_code)
            except ValueError:
                raise IndexedDatasetError(f"{idx_path} has an unknown dtype code {dtype_code}") from None
            (self.sequence_count,) = struct.unpack("<Q", stream.read(8))
            (self.document_count,) = struct.unpack("<Q", stream.read(8))

        expected_size = (
            _HEADER_SIZE
            + self.sequence_count * (4 + 8 + (1 if multimodal else 0))
            + self.document_count * 8
        )
        if file_size < expected_size:
            raise IndexedDatasetError(
                f"{idx_path} is truncated: {file_size} bytes, but its header announces "
                f"{self.sequence_count} sequences and {self.document_count} document indices "
                f"({expected_size} bytes); re-run tools/preprocess_data.py to rebuild it"
            )

        self._buffer = numpy.memmap(idx_path, mode="r", order="C") if file_size else None
        offset = _HEADER_SIZE
        self.sequence_lengths = self._view(numpy.int32, offset, self.sequence_count)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = self._view(numpy.int64, offset, self.sequence_count)
        offset += self.sequence_pointers.nbytes
        self.document_indices = self._view(numpy.int64, offset, self.document_count)
        offset += self.document_indices.nbytes
        self.sequence_modes = self._view(numpy.int8, offset, self.sequence_count) if multimodal else None

    def _view(self, dtype, offset: int, count: int) -> numpy.ndarray:
        return numpy.frombuffer(self._buffer, dtype=dtype, count=count, offset=offset)

    def data_size_in_bytes(self) -> int:
        """The .bin size this index describes."""
        if self.sequence_count == 0:
            return 0
        itemsize = numpy.dtype(self.dtype).itemsize
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize

    def check_layout(self, idx_path: str) -> None:
        """Every length non-negative and every sequence starting at or after the end of the one before (the
        first at or after byte 0), so no read can go negative or overlap; vectorised, in chunks."""
        itemsize = numpy.dtype(self.dtype).itemsize
        previous_end = 0
        for start in range(0, self.sequence_count, _CHUNK):
            lengths = self.sequence_lengths[start : start + _CHUNK]
            pointers = self.sequence_pointers[start : start + _CHUNK]
            negative = numpy.flatnonzero(lengths < 0)
            if negative.size:
                index = start + int(negative[0])
                raise IndexedDatasetError(
                    f"{idx_path} is corrupt: sequence {index} has a negative length ({int(lengths[negative[0]])}); "
                    "re-run tools/preprocess_data.py to rebuild it"
                )
            ends = lengths.astype(numpy.int64)
            ends *= itemsize
            ends += pointers
            overlapping = numpy.flatnonzero(pointers[1:] < ends[:-1])
            if pointers[0] < previous_end or overlapping.size:
                offset = 0 if pointers[0] < previous_end else int(overlapping[0]) + 1
                index = start + offset
                end_before = previous_end if offset == 0 else int(ends[offset - 1])
                where = "before byte 0" if index == 0 else f"inside sequence {index - 1}, which ends at byte {end_before}"
                raise IndexedDatasetError(
                    f"{idx_path} is corrupt: sequence {index} starts at byte {int(pointers[offset])}, {where}; "
                    "re-run tools/preprocess_data.py to rebuild it"
                )
            previous_end = int(ends[-1])

    def content_digest(self) -> str:
        """A digest of what the sample indices are built from (dtype, sequence lengths): a dataset rewritten
        under the same prefix gets another one. SHA-1 of 4 bytes per sequence: about 1 s per 10^8 sequences."""
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"{numpy.dtype(self.dtype).name} {self.sequence_count}".encode())
        for start in range(0, self.sequence_count, _CHUNK):
            digest.update(numpy.ascontiguousarray(self.sequence_lengths[start : start + _CHUNK]).data)
        return digest.hexdigest()


class IndexedDataset:
    """Read-only view of a PREFIX.bin / PREFIX.idx pair, indexed by sequence."""

    def __init__(self, path_prefix: str, multimodal: bool = False, mmap: bool = True) -> None:
        self.path_prefix = path_prefix
        self.multimodal = multimodal
        bin_path, idx_path = get_bin_path(path_prefix), get_idx_path(path_prefix)
        missing = [path for path in (bin_path, idx_path) if not os.path.isfile(path)]
        if missing:
            raise IndexedDatasetError(
                f"dataset prefix {path_prefix!r}: missing {' and '.join(missing)}; --data-path takes the "
                "prefix without .bin/.idx, as written by tools/preprocess_data.py (e.g. PREFIX_text_document)"
            )
        self.index = _IndexReader(idx_path, multimodal)
        self.index.check_layout(idx_path)
        bin_size = os.path.getsize(bin_path)
        expected_bin_size = self.index.data_size_in_bytes()
        if bin_size < expected_bin_size:
            raise IndexedDatasetError(
                f"{bin_path} is truncated: {bin_size} bytes, but {idx_path} describes {expected_bin_size}; "
                "re-run tools/preprocess_data.py to rebuild it"
            )
        if mmap:
            self._data = numpy.memmap(bin_path, mode="r", order="C") if bin_size else numpy.empty(0, numpy.uint8)
        else:
            self._data = numpy.fromfile(bin_path, dtype=numpy.uint8)

    def __len__(self) -> int:
        return self.index.sequence_count

    def __getitem__(self, idx: Union[int, numpy.integer, slice]):
        """A sequence's tokens, or for a slice a list of them."""
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("IndexedDataset slices must be contiguous (step 1)")
            return [self.get(i) for i in range(start, stop)]
        return self.get(int(idx))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        """Tokens of sequence `idx` from `offset`, `length` of them (default: to the end)."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sequence index {idx} out of range for {len(self)} sequences")
        sequence_length = int(self.index.sequence_lengths[idx])
        if length is None:
            length = sequence_length - offset
        itemsize = numpy.dtype(self.index.dtype).itemsize
        start = int(self.index.sequence_pointers[idx]) + offset * itemsize
        return numpy.frombuffer(self._data, dtype=self.index.dtype, count=length, offset=start)

    @property
    def sequence_lengths(self) -> numpy.ndarray:
        return self.index.sequence_lengths

    @property
    def document_indices(self) -> numpy.ndarray:
        return self.index.document_indices

    @property
    def sequence_modes(self) -> Optional[numpy.ndarray]:
        return self.index.sequence_modes

    def get_document_indices(self) -> numpy.ndarray:
        return self.index.document_indices

    @cached_property
    def num_tokens(self) -> int:
        return int(self.index.sequence_lengths.sum(dtype=numpy.int64))

    @cached_property
    def content_digest(self) -> str:
        return self.index.content_digest()

    def token_id_range(self) -> Tuple[int, int]:
        """(smallest, largest) token id of the data the index describes, scanned in chunks; (0, -1) when empty."""
        itemsize = numpy.dtype(self.index.dtype).itemsize
        tokens = numpy.frombuffer(self._data, dtype=self.index.dtype, count=self.index.data_size_in_bytes() // itemsize)
        if tokens.size == 0:
            return 0, -1
        smallest, largest = int(tokens[0]), int(tokens[0])
        for start in range(0, tokens.size, _CACHE_SIZED_CHUNK):  # min then max while the chunk is in the CPU cache
            chunk = tokens[start : start + _CACHE_SIZED_CHUNK]
            smallest, largest = min(smallest, int(chunk.min())), max(largest, int(chunk.max()))
        return smallest, largest

    @staticmethod
    def exists(path_prefix: str) -> bool:
        return os.path.isfile(get_idx_path(path_prefix)) and os.path.isfile(get_bin_path(path_prefix))


class IndexedDatasetBuilder:
    """Writes a dataset sequence by sequence; files appear under their final names only on finalize().

    Until then data goes to temporary files, so an interrupted run never leaves a dataset that looks
    complete. `abort()` (or leaving a `with` block by an exception) removes them.
    """

    def __init__(self, bin_path: str, dtype=numpy.int32, multimodal: bool = False) -> None:
        self.bin_path = bin_path
        self._bin_tmp_path = _temporary_path(bin_path)
        self._data_file = open(self._bin_tmp_path, "wb")
        self.dtype = dtype
        self.multimodal = multimodal
        self.sequence_lengths: List[int] = []
        self.document_indices: List[int] = [0]
        self.sequence_modes: Optional[List[int]] = [] if multimodal else None

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()

    def _write_tokens(self, tokens) -> int:
        array = numpy.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens, dtype=self.dtype)
        self._data_file.write(array.tobytes(order="C"))
        return array.size

    def add_item(self, tokens, mode: int = 0) -> None:
        """Append one sequence (the document continues until end_document())."""
        self.sequence_lengths.append(self._write_tokens(tokens))
        if self.multimodal:
            self.sequence_modes.append(mode)

    def add_document(self, tokens, lengths: Sequence[int], modes: Optional[Sequence[int]] = None) -> None:
        """Append one document whose concatenated `tokens` split into sequences of `lengths`."""
        self._write_tokens(tokens)
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))
        if self.multimodal:
            self.sequence_modes.extend(modes if modes is not None else [0] * len(lengths))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append a whole existing dataset (same dtype), as tools/merge_datasets.py does."""
        index = _IndexReader(get_idx_path(path_prefix), self.multimodal)
        if index.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {path_prefix}: its dtype is {numpy.dtype(index.dtype).name}, "
                f"the output's is {numpy.dtype(self.dtype).name}"
            )
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(index.sequence_lengths.tolist())
        self.document_indices.extend((offset + index.document_indices[1:]).tolist())
        if self.multimodal:
            self.sequence_modes.extend(index.sequence_modes.tolist())
        with open(get_bin_path(path_prefix), "rb") as source:
            while chunk := source.read(1 << 24):
                self._data_file.write(chunk)

    def finalize(self, idx_path: str) -> None:
        """Write the index and move both files to their final names (.bin first, .idx last)."""
        idx_tmp_path = _temporary_path(idx_path)
        try:
            self._data_file.close()  # flushes: may fail on a full disk
            _write_index(idx_tmp_path, self.dtype, self.sequence_lengths, self.document_indices, self.sequence_modes)
        except BaseException:
            _remove_if_present(idx_tmp_path)
            self.abort()
            raise
        os.replace(self._bin_tmp_path, self.bin_path)
        os.replace(idx_tmp_path, idx_path)

    def abort(self) -> None:
        """Drop everything written so far (the temporary file goes even when closing it fails)."""
        try:
            self._data_file.close()
        except OSError:
            pass  # the data is being thrown away: a failed flush changes nothing
        finally:
            _remove_if_present(self._bin_tmp_path)


def merge_datasets(input_prefixes: Sequence[str], output_prefix: str) -> None:
    """Concatenate datasets, in order, into one at `output_prefix`; the dtypes must agree."""
    if not input_prefixes:
        raise IndexedDatasetError("nothing to merge: no input datasets")
    dtype = IndexedDataset(input_prefixes[0]).index.dtype
    with IndexedDatasetBuilder(get_bin_path(output_prefix), dtype=dtype) as builder:
        for prefix in input_prefixes:
            IndexedDataset(prefix)  # validates presence and completeness before copying
            builder.add_index(prefix)
        builder.finalize(get_idx_path(output_prefix))


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
