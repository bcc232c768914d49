"""GPTDataset: fixed-length samples drawn across document boundaries, in an order fixed by the seed.

Three indices define the samples (see docs/FORMATS.md): the document index (the split's documents repeated
once per epoch, shuffled), the sample index (where each sample starts: document position and token offset,
built by the C++ helper) and the shuffle index (a permutation of the samples). They are cached on disk.
"""

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy
import torch

from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.index_cache import IndexCache, is_cache_builder_rank, load_or_build
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import DatasetError, Split, log_single_rank

logger = logging.getLogger(__name__)

# When the samples of the last epoch are fewer than this fraction of an epoch, that epoch is shuffled on its
# own, after the others, so that its few samples are not spread thinly over the whole run (Megatron's rule).
_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


@dataclass
class GPTDatasetConfig(BlendedMegatronDatasetConfig):
    """Configuration of the GPT datasets (Megatron Core's field names and meanings)."""

    reset_position_ids: bool = False
    """Restart the position ids after every end-of-document token."""

    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens."""

    eod_mask_loss: bool = False
    """Leave end-of-document tokens out of the loss."""

    create_attention_mask: bool = True
    """Put the [1, s, s] boolean causal mask (True = masked) in each sample."""

    drop_last_partial_validation_sequence: bool = True
    """Drop the validation split's last, shorter-than-sequence_length sample (else pad it)."""

    add_extra_token_to_sequence: bool = True
    """Read sequence_length + 1 tokens per sample so inputs and labels both have sequence_length tokens."""

    vocab_size: Optional[int] = None
    """The model's vocabulary size (embedding rows): a dataset holding a token id outside [0, vocab_size) is
    refused when it is built (the scan of its .bin is cached beside the indices). None skips the check."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if getattr(self.tokenizer, "eod", None) is None:
            raise DatasetError("GPTDatasetConfig needs a tokenizer with an end-of-document id (tokenizer.eod)")


class GPTDataset(MegatronDataset):
    """A split of one IndexedDataset as fixed-length language-model samples.

    A sample is a dict of `tokens`, `labels` (tokens shifted by one), `loss_mask`, `position_ids` and, with
    config.create_attention_mask, `attention_mask`.
    """

    def __init__(
        self,
        indexed_dataset: IndexedDataset,
        dataset_path: Optional[str],
        indexed_indices: numpy.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: GPTDatasetConfig,
    ) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.masks_and_position_ids_are_cacheable = not any(
            [config.reset_position_ids, config.reset_attention_mask, config.eod_mask_loss]
        )
        self._cached_masks_and_position_ids = None
        self.document_index, self.sample_index, self.shuffle_index = self._build_document_sample_shuffle_indices()

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: IndexedDataset) -> int:
        """GPT splits divide the sequences (documents without --split-sentences)."""
        return low_level_dataset.sequence_lengths.shape[0]

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> IndexedDataset:
        dataset = IndexedDataset(dataset_path, multimodal=False, mmap=config.mmap_bin_files)
        if config.vocab_size is not None:
            _check_token_ids(dataset, config, _cache_directory(dataset.path_prefix, config, GPTDataset.__name__))
        return dataset

    @staticmethod
    def _key_config_attributes():
        return MegatronDataset._key_config_attributes() + [
            "add_extra_token_to_sequence",
            "drop_last_partial_validation_sequence",
        ]

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        """Sample `idx` in shuffled order; None gives a padding sample whose loss mask is all zero."""
        text = torch.from_numpy(self._query_document_sample_shuffle_indices(0 if idx is None else idx))
        if self.config.add_extra_token_to_sequence:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        else:
            tokens = text
            labels = torch.roll(text, shifts=-1, dims=0)
            labels[-1] = self._pad_token_id

        attention_mask, loss_mask, position_ids = self._masks_and_position_ids(tokens)
        loss_mask[labels == self._pad_token_id] = 0.0
        # Padding ids must still be valid embedding rows.
        tokens[tokens == self._pad_token_id] = 0
        labels[labels == self._pad_token_id] = 0
        if idx is None:
            loss_mask.zero_()

        sample = {"tokens": tokens, "labels": labels}
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        sample["loss_mask"] = loss_mask
        sample["position_ids"] = position_ids
        return sample

    def _masks_and_position_ids(self, tokens: torch.Tensor):
        """Without resets every sample has the same masks, so they are computed once (the loss mask copied)."""
        if not self.masks_and_position_ids_are_cacheable:
            return _get_ltor_masks_and_position_ids(
                tokens,
                self.config.tokenizer.eod,
                self.config.reset_position_ids,
                self.config.reset_attention_mask,
                self.config.eod_mask_loss,
                self.config.create_attention_mask,
            )
        if self._cached_masks_and_position_ids is None:
            self._cached_masks_and_position_ids = _get_ltor_masks_and_position_ids(
                tokens, self.config.tokenizer.eod, False, False, False, self.config.create_attention_mask
            )
        attention_mask, loss_mask, position_ids = self._cached_masks_and_position_ids
        return attention_mask, loss_mask.clone(), position_ids

    def _query_document_sample_shuffle_indices(self, idx: int) -> numpy.ndarray:
        """The sequence_length (+1) tokens of sample `idx`, padded with the pad id if the data runs short."""
        sample = self.shuffle_index[idx]
        first_position, first_offset = (int(value) for value in self.sample_index[sample])
        last_position, last_offset = (int(value) for value in self.sample_index[sample + 1])
        extra_token = int(self.config.add_extra_token_to_sequence)
        parts = []
        for position in range(first_position, last_position + 1):
            offset = first_offset if position == first_position else 0
            length = last_offset + extra_token - offset if position == last_position else None
            parts.append(self.dataset.get(int(self.document_index[position]), offset=offset, length=length))
        wanted = self.config.sequence_length + extra_token
        missing = wanted - sum(len(part) for part in parts)
        if missing > 0:
            parts.append(numpy.full(missing, self._pad_token_id, dtype=numpy.int64))
        return numpy.concatenate(parts, dtype=numpy.int64)

    def _build_document_sample_shuffle_indices(self) -> Tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """The three indices, from the cache when it holds them, else built (and cached)."""
        path_to_cache = None if self.config.mock else _cache_directory(self.dataset.path_prefix, self.config, type(self).__name__)
        cache = None
        if path_to_cache:
            cache = IndexCache(
                path_to_cache,
                self.unique_description,
                self.unique_description_hash,
                f"{type(self).__name__}-{self.index_split.name}",
                ("document_index", "sample_index", "shuffle_index"),
            )
        arrays = load_or_build(
            cache, self._build_indices, self.config.shared_storage, f"{type(self).__name__} {self.index_split.name}"
        )
        log_single_rank(logger, logging.INFO, f"> {self.index_split.name}: {arrays['sample_index'].shape[0] - 1} samples")
        return arrays["document_index"], arrays["sample_index"], arrays["shuffle_index"]

    def _build_indices(self) -> Dict[str, numpy.ndarray]:
        sequence_length = self.config.sequence_length
        extra_token = int(self.config.add_extra_token_to_sequence)
        tokens_per_epoch = self._get_num_tokens_per_epoch()
        self._check_enough_tokens(tokens_per_epoch)
        num_epochs = self._get_num_epochs(tokens_per_epoch)

        separate_final_epoch = False
        num_samples_sans_final_epoch = None
        if num_epochs > 1:
            num_samples_sans_final_epoch = ((num_epochs - 1) * tokens_per_epoch - extra_token) // sequence_length
            num_samples_per_epoch = (tokens_per_epoch - extra_token) // sequence_length
            num_samples_from_final_epoch = self.num_samples - num_samples_sans_final_epoch
            separate_final_epoch = num_samples_from_final_epoch < int(
                _SEPARATE_FINAL_EPOCH_THRESHOLD * num_samples_per_epoch
            )

        random_state = numpy.random.RandomState(self.config.random_seed)
        if separate_final_epoch:
            document_index = numpy.concatenate(
                [
                    _build_document_index(self.indices, num_epochs - 1, random_state),
                    _build_document_index(self.indices, 1, random_state),
                ]
            )
        else:
            document_index = _build_document_index(self.indices, num_epochs, random_state)

        drop_last_partial_sequence = (
            self.config.drop_last_partial_validation_sequence if self.index_split == Split.valid else True
        )
        sample_index = helpers.build_sample_idx(
            self.dataset.sequence_lengths,
            document_index,
            sequence_length,
            num_epochs,
            tokens_per_epoch,
            drop_last_partial_sequence,
            self.config.add_extra_token_to_sequence,
        )
        num_samples_built = sample_index.shape[0] - 1
        first_shuffled_range = num_samples_sans_final_epoch if separate_final_epoch else num_samples_built
        shuffle_index = _build_shuffle_index(first_shuffled_range, num_samples_built, random_state)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def _get_num_tokens_per_epoch(self) -> int:
        return int(numpy.sum(self.dataset.sequence_lengths[self.indices], dtype=numpy.int64))

    def _get_num_epochs(self, num_tokens_per_epoch: int) -> int:
        """The fewest epochs (at least one) whose tokens cover num_samples samples."""
        if not self.num_samples:
            return 1
        tokens_needed = self.num_samples * self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
        return max(1, math.ceil(tokens_needed / num_tokens_per_epoch))

    def _check_enough_tokens(self, tokens_per_epoch: int) -> None:
        """One epoch must fill at least one sample, else samples would repeat the split's documents within one."""
        if self.num_samples == 0:
            return
        tokens_per_sample = self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
        if tokens_per_epoch < tokens_per_sample:
            raise DatasetError(
                f"the {self.index_split.name} split of {self.dataset_path or 'the mock dataset'} holds "
                f"{len(self.indices)} documents with {tokens_per_epoch} tokens, fewer than the {tokens_per_sample} "
                f"one sample of sequence length {self.config.sequence_length} reads; use a shorter --seq-length, "
                "more data, or a larger share for this split in --split (a share of 0 skips the split)"
            )


def _cache_directory(path_prefix: str, config: GPTDatasetConfig, class_name: str) -> Optional[str]:
    """config.path_to_cache, by default a cache folder beside the dataset's files (Megatron's place)."""
    if config.path_to_cache is None:
        return os.path.join(path_prefix, "cache", f"{class_name}_indices")
    return config.path_to_cache


def _check_token_ids(dataset: IndexedDataset, config: GPTDatasetConfig, path_to_cache: Optional[str]) -> None:
    """Refuse token ids the model has no embedding row for; the .bin is scanned once, then the range is cached
    (keyed on the index digest and the .bin's size and modification time)."""
    token_id_range = _cached_token_id_range(dataset, path_to_cache, config.shared_storage)
    smallest, largest = (int(value) for value in token_id_range)
    if smallest < 0 or largest >= config.vocab_size:
        bad = smallest if smallest < 0 else largest
        raise DatasetError(
            f"dataset {dataset.path_prefix} holds token id {bad} (ids range from {smallest} to {largest}), outside the "
            f"model's vocabulary of {config.vocab_size}; tokenize it with the model's tokenizer (--tokenizer-type, "
            "--vocab-file / --tokenizer-model) or size the vocabulary to fit (--vocab-size, --make-vocab-size-divisible-by)"
        )


def _cached_token_id_range(dataset: IndexedDataset, path_to_cache: Optional[str], shared_storage: bool) -> numpy.ndarray:
    if not path_to_cache:
        return numpy.array(dataset.token_id_range())
    bin_stat = os.stat(get_bin_path(dataset.path_prefix))
    description = json.dumps(
        {"index_digest": dataset.content_digest, "bin_bytes": bin_stat.st_size, "bin_mtime_ns": bin_stat.st_mtime_ns}
    )
    cache = IndexCache(
        path_to_cache,
        description,
        hashlib.md5(description.encode("utf-8")).hexdigest(),
        "IndexedDataset",
        ("token_id_range",),
    )
    arrays = cache.load()
    if arrays is None:
        arrays = {"token_id_range": numpy.array(dataset.token_id_range(), dtype=numpy.int64)}
        if is_cache_builder_rank(shared_storage):
            cache.save(arrays)
    return arrays["token_id_range"]


def _build_document_index(
    documents: numpy.ndarray, num_epochs: int, random_state: numpy.random.RandomState
) -> numpy.ndarray:
    """The documents repeated num_epochs times and shuffled together (int32, as the C++ helper reads it)."""
    document_index = numpy.tile(numpy.asarray(documents, dtype=numpy.int32), num_epochs)
    random_state.shuffle(document_index)
    return document_index


def _build_shuffle_index(
    num_samples: int, total_size: int, random_state: numpy.random.RandomState
) -> numpy.ndarray:
    """A permutation of [0, total_size) that shuffles [0, num_samples) and [num_samples, total_size) apart."""
    dtype = numpy.uint32 if total_size < numpy.iinfo(numpy.uint32).max - 1 else numpy.int64
    first = numpy.arange(num_samples, dtype=dtype)
    random_state.shuffle(first)
    if num_samples == total_size:
        return first
    last = numpy.arange(num_samples, total_size, dtype=dtype)
    random_state.shuffle(last)
    return numpy.concatenate((first, last))


def _get_ltor_masks_and_position_ids(
    data: torch.Tensor,
    eod_token: int,
    reset_position_ids: bool,
    reset_attention_mask: bool,
    eod_mask_loss: bool,
    create_attention_mask: bool,
):
    """(attention_mask [1, s, s] bool with True = masked, or None; loss_mask [s] float; position_ids [s] long).

    With the resets a document after an end-of-document token starts again at position 0 and sees no token
    before it.
    """
    seq_length = data.numel()
    is_eod = data == eod_token
    loss_mask = torch.ones(seq_length, dtype=torch.float)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0

    positions = torch.arange(seq_length, dtype=torch.long)
    position_ids = positions
    if reset_position_ids:
        # Each token's document starts right after the last end-of-document token before it.
        starts = torch.zeros(seq_length, dtype=torch.long)
        after_eod = positions[is_eod] + 1
        after_eod = after_eod[after_eod < seq_length]
        starts[after_eod] = after_eod
        position_ids = positions - torch.cummax(starts, dim=0).values

    attention_mask = None
    if create_attention_mask:
        allowed = torch.ones(seq_length, seq_length, dtype=torch.bool).tril_()
        if reset_attention_mask:
            document = torch.cumsum(is_eod, dim=0) - is_eod.long()  # end-of-document tokens before each token
            allowed &= document.unsqueeze(1) == document.unsqueeze(0)
        attention_mask = (~allowed).unsqueeze(0)
    return attention_mask, loss_mask, position_ids


class MockGPTLowLevelDataset:
    """Synthetic documents standing in for an IndexedDataset (Megatron's mock data, same lengths and ids).

    Document i has a length drawn once from a fixed-seed generator and holds 1, 2, 3, ... (modulo the
    vocabulary) followed by the end-of-document id.
    """

    seed: int = 0
    size: int = 100000
    max_sequence_length: int = 4096

    def __init__(self, tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eod_token = tokenizer.eod
        generator = numpy.random.default_rng(seed=self.seed)
        self.sequence_lengths = generator.integers(
            low=1, high=self.max_sequence_length, size=self.size, dtype=numpy.int32
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> numpy.ndarray:
        length = int(self.sequence_lengths[idx])
        return numpy.concatenate(
            [(numpy.arange(length - 1, dtype=numpy.int64) + 1) % self.vocab_size, [self.eod_token]]
        ).astype(numpy.int64)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        if length is None:
            length = int(self.sequence_lengths[idx]) - offset
        return self[idx][offset : offset + length]


class MockGPTDataset(GPTDataset):
    """A GPTDataset over MockGPTLowLevelDataset, for runs without data files (--mock-data)."""

    def __init__(
        self,
        dataset: MockGPTLowLevelDataset,
        dataset_path: Optional[str],
        indices: numpy.ndarray,
        num_samples: int,
        index_split: Split,
        config: GPTDatasetConfig,
    ) -> None:
        if not config.mock:
            raise DatasetError("MockGPTDataset needs a config without blend or blend_per_split (mock data)")
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MockGPTLowLevelDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: Optional[str], config: GPTDatasetConfig) -> MockGPTLowLevelDataset:
        return MockGPTLowLevelDataset(config.tokenizer)
