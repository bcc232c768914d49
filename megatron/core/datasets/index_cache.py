"""On-disk cache of dataset indices: .npy arrays plus a JSON description, named by the description's hash.

A cache entry is complete when its description file exists and matches: arrays are written first, each to a
temporary name renamed into place, and the description last. Loading is by mmap. One rank builds an entry
(global rank 0, or the first rank of each node when nodes do not share storage); the others load it after a
barrier, which the BlendedMegatronDatasetBuilder provides.
"""

import logging
import os
import socket
from typing import Callable, Dict, Optional, Sequence

import numpy
import torch

from megatron.core.datasets.utils import DatasetError, log_single_rank

logger = logging.getLogger(__name__)


def is_cache_builder_rank(shared_storage: bool) -> bool:
    """Whether this process writes cache entries: global rank 0, or each node's first rank without shared storage."""
    if not torch.distributed.is_initialized():
        return True
    rank = torch.distributed.get_rank()
    if shared_storage:
        return rank == 0
    return int(os.environ.get("LOCAL_RANK", rank)) == 0


class IndexCache:
    """The files of one cache entry: `{directory}/{hash}-{name}-{array}.npy` and `...-description.txt`."""

    def __init__(self, directory: str, description: str, description_hash: str, name: str, arrays: Sequence[str]):
        self.directory = directory
        self.description = description
        base = os.path.join(directory, f"{description_hash}-{name}")
        self.description_path = f"{base}-description.txt"
        self.array_paths = {array: f"{base}-{array}.npy" for array in arrays}

    def load(self) -> Optional[Dict[str, numpy.ndarray]]:
        """The cached arrays (memory-mapped) when the entry is complete and describes the same build, else None."""
        try:
            with open(self.description_path) as stream:
                if stream.read() != self.description:
                    return None
            return {array: numpy.load(path, mmap_mode="r") for array, path in self.array_paths.items()}
        except (OSError, ValueError):
            return None

    def save(self, arrays: Dict[str, numpy.ndarray]) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            for array, path in self.array_paths.items():
                _write_atomically(path, lambda stream, value=arrays[array]: numpy.save(stream, value, allow_pickle=False))
            _write_atomically(self.description_path, lambda stream: stream.write(self.description.encode("utf-8")))
        except OSError as error:
            raise DatasetError(
                f"cannot write the dataset index cache in {self.directory} ({error.strerror}); point "
                "--data-cache-path (path_to_cache) at a writable folder"
            ) from error


def _write_atomically(path: str, write: Callable) -> None:
    temporary = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as stream:
            write(stream)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_or_build(
    cache: Optional[IndexCache], build: Callable[[], Dict[str, numpy.ndarray]], shared_storage: bool, what: str
) -> Dict[str, numpy.ndarray]:
    """The arrays from the cache when it has them; else built (and saved) here if this rank writes the cache."""
    if cache is None:
        return build()
    arrays = cache.load()
    if arrays is not None:
        log_single_rank(logger, logging.INFO, f"Loaded the {what} indices from {cache.description_path}")
        return arrays
    if not is_cache_builder_rank(shared_storage):
        raise DatasetError(
            f"the {what} indices are not in {cache.directory} although the rank that builds them has finished; "
            "if the nodes do not share that folder, pass --no-shared-storage (shared_storage=False) or a "
            "--data-cache-path every node sees"
        )
    log_single_rank(logger, logging.INFO, f"Building the {what} indices")
    arrays = build()
    cache.save(arrays)
    return arrays
