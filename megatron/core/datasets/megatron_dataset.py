"""MegatronDataset: the base of the mid-level datasets (GPTDataset, ...) built over one low-level dataset."""

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Union

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split, log_single_rank

LowLevelDataset = Union[IndexedDataset, Iterable]

logger = logging.getLogger(__name__)

# Never a token id in a dataset, so padding with it cannot be confused with data.
_PAD_TOKEN_ID = -1


class MegatronDataset(ABC, torch.utils.data.Dataset):
    """A split of one low-level dataset, drawn `num_samples` times (one epoch when None).

    Args:
        dataset: the low-level dataset (an IndexedDataset, or a mock stand-in)
        dataset_path: its path prefix, for bookkeeping and the cache identity
        indices: the sequence indices of the low-level dataset this split exposes
        num_samples: the minimum number of samples to build, or None for exactly one epoch
        index_split: which split this is
        config: the dataset config
    """

    def __init__(
        self,
        dataset: LowLevelDataset,
        dataset_path: Optional[str],
        indices: numpy.ndarray,
        num_samples: Optional[int],
        index_split: Split,
        config: BlendedMegatronDatasetConfig,
    ) -> None:
        self.dataset = dataset
        self.dataset_path = dataset_path
        self.indices = indices
        self.num_samples = num_samples
        self.index_split = index_split
        self.config = config

        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["dataset_path"] = self.dataset_path
        self.unique_identifiers["dataset_size"] = _describe_size(dataset)
        self.unique_identifiers["num_samples"] = self.num_samples
        self.unique_identifiers["index_split"] = self.index_split.name
        for attribute in self._key_config_attributes():
            self.unique_identifiers[attribute] = getattr(self.config, attribute)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8")).hexdigest()

        self._pad_token_id = self._resolve_pad_token_id()

    def _resolve_pad_token_id(self) -> int:
        """The tokenizer's pad id, unless it is also another special token (then -1, which no data holds)."""
        pad = getattr(self.config.tokenizer, "pad", _PAD_TOKEN_ID)
        if pad is None or pad == _PAD_TOKEN_ID:
            return _PAD_TOKEN_ID
        others = {getattr(self.config.tokenizer, name, None) for name in ("eod", "eos", "bos")}
        if pad not in others:
            return pad
        if self.config.allow_ambiguous_pad_tokens:
            log_single_rank(
                logger,
                logging.WARNING,
                f"the pad id {pad} is also another special token; tokens with that id are masked out of the loss",
            )
            return pad
        log_single_rank(
            logger,
            logging.WARNING,
            f"the pad id {pad} is also another special token, so pad-masking is off (such ids stay in the loss)",
        )
        return _PAD_TOKEN_ID

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: LowLevelDataset) -> int:
        """How many units (sequences for GPT) the low-level dataset holds: what --split divides."""
        raise NotImplementedError

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: BlendedMegatronDatasetConfig) -> LowLevelDataset:
        """Open the low-level dataset at `dataset_path` (shared by the splits built over it)."""
        raise NotImplementedError

    @staticmethod
    def _key_config_attributes() -> List[str]:
        """Config attributes that shape the indices, hence the cache identity."""
        return ["random_seed", "sequence_length", "split", "split_matrix"]

    @abstractmethod
    def __len__(self) -> int:
        pass

    @abstractmethod
    def __getitem__(self, idx: int) -> Dict[str, Union[torch.Tensor, numpy.ndarray]]:
        pass


def _describe_size(dataset: Any) -> Dict[str, int]:
    """What identifies the low-level dataset's content: a dataset rewritten under the same prefix (other
    document lengths) gets fresh indices."""
    description = {"sequences": len(dataset)}
    if isinstance(dataset, IndexedDataset):
        description["bin_bytes"] = dataset.index.data_size_in_bytes()
        description["index_digest"] = dataset.content_digest
    return description
