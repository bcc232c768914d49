"""BlendedMegatronDatasetBuilder: the train, valid and test datasets of a config, built once and cached.

Per split, a single dataset prefix gives a mid-level dataset (e.g. GPTDataset) directly; several give one
mid-level dataset each, blended by a BlendedDataset. Each blended dataset is sized to its share of the
requested samples plus a small surplus, so the blend never runs past its end.

In a distributed run the ranks that write the index cache (global rank 0, or the first rank of each node
without shared storage) build first; every rank then learns whether they succeeded, so a failure stops all
ranks with its message instead of leaving them at a barrier; only then do the other ranks load the cache.
"""

import logging
import math
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple, Type, Union

import numpy
import torch

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.index_cache import is_cache_builder_rank
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import DatasetError, Split, log_single_rank, normalize

logger = logging.getLogger(__name__)

MidLevelDataset = MegatronDataset
TopLevelDataset = Union[BlendedDataset, MidLevelDataset]

# (split index, (start, end) fraction of the documents, number of samples or None for one epoch)
_MidLevelRequest = Tuple[int, Tuple[float, float], Optional[int]]


class BlendedMegatronDatasetBuilder:
    """Builds the [train, valid, test] datasets (each None when its split is empty).

    Args:
        cls: the mid-level dataset class, e.g. GPTDataset or MockGPTDataset
        sizes: per split, the minimum number of samples, or None for one epoch (exact counts)
        is_built_on_rank: whether this rank needs the datasets (ranks answering False get None)
        config: the dataset config
    """

    def __init__(
        self,
        cls: Type[MidLevelDataset],
        sizes: List[Optional[int]],
        is_built_on_rank: Callable[[], bool],
        config: BlendedMegatronDatasetConfig,
    ):
        if len(sizes) != len(Split) or any(size is not None and size < 0 for size in sizes):
            raise DatasetError(f"sizes must give a non-negative sample count (or None) for train, valid and test, got {sizes}")
        self.cls = cls
        self.sizes = [None if size is None else int(size) for size in sizes]
        self.is_built_on_rank = is_built_on_rank
        self.config = config
        for split, plan in zip(Split, self._split_plans()):
            if plan is not None and len(plan[0]) > 1 and plan[1] is not None and self.sizes[split.value] is None:
                raise DatasetError(f"the weighted {split.name} blend needs a sample count, not None")

    def build(self) -> List[Optional[TopLevelDataset]]:
        """The three datasets; call it on every rank (it synchronises them)."""
        log_single_rank(logger, logging.INFO, f"Building {self.cls.__name__} splits with sizes={self.sizes}")
        plans = self._split_plans()
        requests = defaultdict(list)  # prefix -> [_MidLevelRequest]
        for split_index, plan in enumerate(plans):
            if plan is None:
                continue
            prefixes, weights, bookend = plan
            for prefix, num_samples in zip(prefixes, self._mid_level_sizes(split_index, prefixes, weights)):
                requests[prefix].append((split_index, bookend, num_samples))
        mid_level = self._build_mid_level_datasets(requests)
        mid_level.update(self._rebuild_unweighted_blends_past_one_epoch(plans, mid_level))

        datasets: List[Optional[TopLevelDataset]] = [None] * len(Split)
        blend_jobs = []
        for split_index, plan in enumerate(plans):
            if plan is None:
                continue
            prefixes, weights, _ = plan
            members = [mid_level.get((prefix, split_index)) for prefix in prefixes]
            if len(prefixes) == 1:
                datasets[split_index] = members[0] if self._built_here() else None
            elif all(member is not None for member in members):
                blend_weights, blend_size = self._blend_weights_and_size(split_index, members, weights)
                blend_jobs.append((split_index, members, blend_weights, blend_size))
        blends = self._run_on_cache_builders_first(
            [lambda members=members, w=w, size=size: BlendedDataset(members, w, size, self.config) for _, members, w, size in blend_jobs]
        )
        for (split_index, *_), blend in zip(blend_jobs, blends):
            datasets[split_index] = blend if self._built_here() else None
        return datasets

    def _split_plans(self) -> List[Optional[Tuple[List[Optional[str]], Optional[List[float]], Tuple[float, float]]]]:
        """Per split: (prefixes, weights or None, (start, end) fraction of each dataset's documents), or None."""
        if self.config.mock:
            return [None if bookend is None else ([None], None, bookend) for bookend in self.config.split_matrix]
        if self.config.blend is not None:
            prefixes, weights = self.config.blend
            return [None if bookend is None else (prefixes, weights, bookend) for bookend in self.config.split_matrix]
        return [None if blend is None else (blend[0], blend[1], (0.0, 1.0)) for blend in self.config.blend_per_split]

    def _mid_level_sizes(self, split_index: int, prefixes, weights) -> List[Optional[int]]:
        """Samples to build per prefix: all of the split's for one prefix, a share plus surplus in a weighted blend."""
        size = self.sizes[split_index]
        if len(prefixes) == 1:
            return [size]
        if weights is None:
            return [None] * len(prefixes)  # one epoch each; the blend then weighs them by their lengths
        return _get_size_per_split_per_dataset(normalize(weights), size, self.config.mid_level_dataset_surplus)

    def _blend_weights_and_size(self, split_index: int, members, weights) -> Tuple[List[float], Optional[int]]:
        size = self.sizes[split_index]
        if weights is None:
            lengths = [len(member) for member in members]
            if size is None or size <= sum(lengths):
                return lengths, size
            weights = lengths  # the members were rebuilt with their shares of `size`, as for a weighted blend
        elif self.config.renormalize_blend_weights:
            weights = self._mid_level_sizes(split_index, members, weights)
        return normalize(weights), sum(_get_size_per_split_per_dataset(normalize(weights), size, 0.0))

    def _rebuild_unweighted_blends_past_one_epoch(self, plans, mid_level) -> Dict:
        """An unweighted blend asked for more samples than one epoch of its datasets holds is rebuilt with
        each dataset's share (by its length) of the size, so its datasets wrap into further epochs."""
        requests = defaultdict(list)
        for split_index, plan in enumerate(plans):
            size = self.sizes[split_index]
            if plan is None or len(plan[0]) == 1 or plan[1] is not None or size is None:
                continue
            prefixes, _, bookend = plan
            members = [mid_level.get((prefix, split_index)) for prefix in prefixes]
            if any(member is None for member in members):
                continue
            lengths = [len(member) for member in members]
            if size <= sum(lengths):
                continue
            buffered = _get_size_per_split_per_dataset(normalize(lengths), size, self.config.mid_level_dataset_surplus)
            for prefix, num_samples in zip(prefixes, buffered):
                requests[prefix].append((split_index, bookend, num_samples))
        # Every rank runs this (possibly empty) round, so the ranks stay in step.
        return self._build_mid_level_datasets(requests)

    def _build_mid_level_datasets(self, requests: Dict[Optional[str], List[_MidLevelRequest]]) -> Dict:
        """{(prefix, split index): dataset} for the requests, one job per prefix (its low-level dataset opened once)."""
        prefixes = list(requests)
        results = self._run_on_cache_builders_first(
            [lambda prefix=prefix: self._build_splits_of_prefix(prefix, requests[prefix]) for prefix in prefixes]
        )
        return {key: dataset for splits in results for key, dataset in splits.items()}

    def _build_splits_of_prefix(self, prefix: Optional[str], requests: List[_MidLevelRequest]) -> Dict:
        low_level_dataset = self.cls.build_low_level_dataset(prefix, self.config)
        num_elements = self.cls.numel_low_level_dataset(low_level_dataset)
        datasets = {}
        for split_index, (start, end), num_samples in requests:
            indices = numpy.arange(
                int(round(start * float(num_elements))), int(round(end * float(num_elements))), dtype=numpy.int32
            )
            datasets[(prefix, split_index)] = self.cls(
                low_level_dataset, prefix, indices, num_samples, Split(split_index), self.config
            )
        return datasets

    def _built_here(self) -> bool:
        return not torch.distributed.is_initialized() or self.is_built_on_rank()

    def _run_on_cache_builders_first(self, jobs: List[Callable]) -> List:
        """Run the jobs on the cache-writing ranks (whether or not they need the datasets), then, when all of
        those succeeded, on the other ranks that need them, which find every index in the cache. Returns the
        results ([] where nothing ran)."""
        if not torch.distributed.is_initialized():
            return self._run(jobs)
        builds_first = is_cache_builder_rank(self.config.shared_storage)
        results, failure = [], None
        if builds_first:
            try:
                results = self._run(jobs)
            except Exception as error:  # any failure: the peers must hear of it rather than wait
                failure = error
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, None if failure is None else str(failure))
        failed_ranks = [rank for rank, message in enumerate(messages) if message is not None]
        if failure is not None:
            raise failure
        if failed_ranks:
            rank = failed_ranks[0]
            raise DatasetError(f"rank {rank} could not build the datasets: {messages[rank]}")
        if not builds_first and self.is_built_on_rank():
            results = self._run(jobs)
        return results

    def _run(self, jobs: List[Callable]) -> List:
        if self.config.num_dataset_builder_threads == 1 or len(jobs) < 2:
            return [job() for job in jobs]
        with ThreadPoolExecutor(max_workers=self.config.num_dataset_builder_threads) as executor:
            return list(executor.map(lambda job: job(), jobs))


def _get_size_per_split_per_dataset(normalized_weights: List[float], size: int, surplus: float) -> List[int]:
    """Samples to build per dataset: its share of `size`, rounded up, plus `surplus` of that, rounded up."""
    return [int(math.ceil(math.ceil(size * weight) * (1 + surplus))) for weight in normalized_weights]
