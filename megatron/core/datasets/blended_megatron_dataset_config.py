"""BlendedMegatronDatasetConfig: what to read (blend or per-split blends), how to split it, where to cache."""

import re
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from megatron.core.datasets.utils import Blend, DatasetError, Split, check_blend_weights, normalize


@dataclass
class BlendedMegatronDatasetConfig:
    """Configuration of the Megatron Core datasets (Megatron Core's field names and meanings)."""

    random_seed: int
    """Seed of every shuffle made while building the dataset indices."""

    sequence_length: int
    """Tokens per sample (each sample reads one more, for the shifted labels)."""

    blend: Optional[Blend] = None
    """(prefixes, weights or None) shared by all splits, e.g. (["A", "B"], [0.3, 0.7]). With weights None
    each dataset weighs as many samples as it holds. Not with blend_per_split."""

    blend_per_split: Optional[List[Optional[Blend]]] = None
    """One blend (or None) for each of train, valid and test. Not with blend or split."""

    split: Optional[str] = None
    """Shares of the documents for train, valid and test, e.g. "949,50,1". Needed with blend."""

    split_matrix: Optional[List[Optional[Tuple[float, float]]]] = field(init=False, default=None)
    """Per split, the (start, end) fraction of the documents it takes, or None; derived from split."""

    num_dataset_builder_threads: int = 1
    """Threads that build the datasets of different prefixes at once."""

    path_to_cache: Optional[str] = None
    """Folder of the cached indices (default: a cache folder beside each dataset's files)."""

    mmap_bin_files: bool = True
    """Read the .bin files through mmap (else into memory)."""

    mock: bool = field(init=False, default=False)
    """Synthetic data instead of files; set when neither blend nor blend_per_split is given."""

    tokenizer: Optional[Any] = None
    """The tokenizer: its eod (and pad) ids shape the masks."""

    mid_level_dataset_surplus: float = 0.005
    """Extra fraction of samples each blended dataset builds beyond its share, so the blend never runs out."""

    renormalize_blend_weights: bool = False
    """Weigh a weighted blend by the samples each of its datasets was built with (its share plus the surplus,
    rounded up) instead of by the given weights (Megatron-LM core_v0.9.0); off keeps the sample order."""

    allow_ambiguous_pad_tokens: bool = False
    """Mask tokens equal to the pad id even when the pad id is also another special token (usually a bug)."""

    shared_storage: bool = True
    """Whether every node sees the same cache folder. True: global rank 0 builds the indices and the others
    load them; False: the first rank of each node builds its own copy."""

    def __post_init__(self) -> None:
        if self.sequence_length is None or self.sequence_length <= 0:
            raise DatasetError(f"sequence_length must be a positive integer, got {self.sequence_length}")
        if self.num_dataset_builder_threads < 1:
            raise DatasetError("num_dataset_builder_threads must be at least 1")
        if self.mid_level_dataset_surplus < 0:
            raise DatasetError("mid_level_dataset_surplus must not be negative")
        if self.blend_per_split is not None and any(self.blend_per_split):
            self._check_blend_per_split()
        else:
            self.blend_per_split = None
            if self.blend is None:
                self.mock = True
                self.split = self.split or "1,1,1"
            else:
                _check_blend(self.blend, "blend")
                if self.split is None:
                    raise DatasetError("a blend needs a split such as '949,50,1' (train, valid, test shares)")
            self.split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(self.split))

    def _check_blend_per_split(self) -> None:
        if self.blend is not None:
            raise DatasetError("give either a blend shared by all splits or one blend per split, not both")
        if self.split is not None:
            raise DatasetError(
                "a split such as '949,50,1' divides one blend; with one blend per split leave split unset"
            )
        if len(self.blend_per_split) != len(Split):
            raise DatasetError(f"blend_per_split needs {len(Split)} entries (train, valid, test), not {len(self.blend_per_split)}")
        for split, blend in zip(Split, self.blend_per_split):
            if blend is not None:
                _check_blend(blend, f"the {split.name} blend")


def _check_blend(blend: Blend, name: str) -> None:
    prefixes, weights = blend
    if not prefixes:
        raise DatasetError(f"{name} names no dataset prefix")
    if weights is not None:
        check_blend_weights(weights, prefixes, name)


def parse_and_normalize_split(split: str) -> List[float]:
    """[train, valid, test] shares summing to 1 from a string such as "949,50,1" (or "949/50/1")."""
    parts = [part.strip() for part in re.split(r"[,/]", split)]
    try:
        shares = [float(part) for part in parts]
    except ValueError:
        shares = None
    if (
        shares is None
        or len(shares) != len(Split)
        or not all(share >= 0 and share != float("inf") for share in shares)
        or sum(shares) <= 0
    ):
        raise DatasetError(
            f"split {split!r} must be three non-negative numbers with a positive sum, the train, valid and "
            "test shares, e.g. '949,50,1'"
        )
    return normalize(shares)


def convert_split_vector_to_split_matrix(
    vector_a: List[float], vector_b: Optional[List[float]] = None
) -> List[Optional[Tuple[float, float]]]:
    """Per split, its (start, end) fraction of the documents, or None when empty.

    [0.99, 0.01, 0.0] -> [(0.0, 0.99), (0.99, 1.0), None]. With vector_b, each range is the overlap of the
    two vectors' ranges (None when they do not overlap).
    """

    def bookends(vector: List[float]) -> List[Tuple[float, float]]:
        edges = [0.0]
        for share in vector:
            edges.append(edges[-1] + share)
        return list(zip(edges[:-1], edges[1:]))

    matrix = []
    for (start_a, end_a), (start_b, end_b) in zip(bookends(vector_a), bookends(vector_b or vector_a)):
        start, end = max(start_a, start_b), min(end_a, end_b)
        matrix.append((start, end) if end > start else None)
    return matrix
