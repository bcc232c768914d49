"""BlendedDataset: several datasets interleaved so that every prefix of the blend follows the weights."""

import hashlib
import json
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple, Union

import numpy
import torch

from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.index_cache import IndexCache, load_or_build
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import DatasetError, normalize

logger = logging.getLogger(__name__)

_VERBOSE = False


class BlendedDataset(torch.utils.data.Dataset):
    """Sample i of the blend is sample dataset_sample_index[i] of datasets[dataset_index[i]].

    Args:
        datasets: the datasets to blend (all of one split)
        weights: their weights; with size None, the exact number of samples to take from each
        size: the number of samples of the blend, or None to take exactly `weights` samples of each dataset
        config: the dataset config (cache folder, sharing of storage)
    """

    def __init__(
        self,
        datasets: List[MegatronDataset],
        weights: List[Union[int, float]],
        size: Optional[int],
        config: BlendedMegatronDatasetConfig,
    ) -> None:
        if not datasets or len(datasets) != len(weights):
            raise DatasetError(f"a blend needs one weight per dataset, got {len(weights)} for {len(datasets)}")
        if len(datasets) > numpy.iinfo(numpy.int16).max:
            raise DatasetError(f"a blend holds at most {numpy.iinfo(numpy.int16).max} datasets, got {len(datasets)}")
        if len({dataset.index_split for dataset in datasets}) != 1:
            raise DatasetError("the datasets of a blend must all belong to the same split")
        if not all(weight > 0 for weight in weights):
            raise DatasetError(f"blend weights must be positive, got {weights}")
        if size is None and not all(float(weight).is_integer() for weight in weights):
            raise DatasetError("a blend without a size takes `weights` samples of each dataset: they must be whole")

        self.datasets = datasets
        self.split = datasets[0].index_split
        self.weights = normalize(weights) if size is not None else [int(weight) for weight in weights]
        self.size = size
        self.config = config

        unique_identifiers = OrderedDict()
        unique_identifiers["class"] = type(self).__name__
        unique_identifiers["datasets"] = [dataset.unique_identifiers for dataset in datasets]
        unique_identifiers["split"] = self.split.name
        unique_identifiers["weights"] = self.weights
        unique_identifiers["size"] = self.size
        self.unique_description = json.dumps(unique_identifiers, indent=4)
        self.unique_description_hash = hashlib.md5(self.unique_description.encode("utf-8")).hexdigest()

        self.dataset_index, self.dataset_sample_index = self._build_indices()

    def __len__(self) -> int:
        return self.dataset_index.shape[0]

    def __getitem__(self, idx: int) -> Dict[str, Union[int, numpy.ndarray, torch.Tensor]]:
        dataset_id = int(self.dataset_index[idx])
        return {"dataset_id": dataset_id, **self.datasets[dataset_id][int(self.dataset_sample_index[idx])]}

    def _build_indices(self) -> Tuple[numpy.ndarray, numpy.ndarray]:
        cache = None
        if self.config.path_to_cache:
            cache = IndexCache(
                self.config.path_to_cache,
                self.unique_description,
                self.unique_description_hash,
                f"{type(self).__name__}-{self.split.name}",
                ("dataset_index", "dataset_sample_index"),
            )
        arrays = load_or_build(cache, self._build_blend, self.config.shared_storage, f"{type(self).__name__} {self.split.name}")
        return arrays["dataset_index"], arrays["dataset_sample_index"]

    def _build_blend(self) -> Dict[str, numpy.ndarray]:
        size = self.size if self.size is not None else sum(self.weights)
        dataset_index = numpy.zeros(size, dtype=numpy.int16)
        dataset_sample_index = numpy.zeros(size, dtype=numpy.int64)
        if self.size is not None:
            helpers.build_blending_indices(
                dataset_index, dataset_sample_index, self.weights, len(self.datasets), size, _VERBOSE
            )
        else:
            helpers.build_exhaustive_blending_indices(
                dataset_index, dataset_sample_index, numpy.array(self.weights, dtype=numpy.int64), len(self.datasets)
            )
        self._check_no_oversampling(dataset_index)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def _check_no_oversampling(self, dataset_index: numpy.ndarray) -> None:
        """Every dataset must hold the samples the blend draws from it, or reading would go out of range."""
        drawn = numpy.bincount(dataset_index, minlength=len(self.datasets))
        for number, (dataset, count) in enumerate(zip(self.datasets, drawn)):
            if count > len(dataset):
                raise DatasetError(
                    f"the {self.split.name} blend draws {count} samples from dataset {number} "
                    f"({dataset.dataset_path}), which holds {len(dataset)}; raise mid_level_dataset_surplus "
                    f"(now {self.config.mid_level_dataset_surplus}) or build that dataset with more samples"
                )
