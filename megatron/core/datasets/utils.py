"""Small shared pieces of the dataset package: the split enum, blend parsing and checks, rank-0 logging."""

import logging
import math
from enum import Enum
from typing import List, Optional, Sequence, Tuple

import numpy
import torch
from megatron.core.datasets import helpers
from megatron.core.errors import UserError

Blend = Tuple[List[str], Optional[List[float]]]


class Split(Enum):
    train = 0
    valid = 1
    test = 2


class DatasetError(UserError, ValueError):
    """Bad dataset input (a blend, a split, a size, a cache folder); the message says what and how to fix it."""


def log_single_rank(logger: logging.Logger, *args, rank: int = 0, **kwargs) -> None:
    """Log on one rank only (every rank when torch.distributed is not initialised)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != rank:
        return
    logger.log(*args, **kwargs)


def normalize(weights: Sequence[float]) -> List[float]:
    """The weights divided by their sum."""
    array = numpy.array(weights, dtype=numpy.float64)
    return (array / array.sum()).tolist()


def check_blend_weights(weights: Sequence[float], prefixes: Sequence[str], source: str) -> None:
    """Every weight finite and positive: a blend cannot draw a negative or zero share."""
    if len(weights) != len(prefixes):
        raise DatasetError(f"{source}: {len(weights)} weights for {len(prefixes)} dataset prefixes")
    for weight, prefix in zip(weights, prefixes):
        if not math.isfinite(weight) or weight <= 0:
            raise DatasetError(
                f"{source}: weight {weight} for {prefix} must be a positive number "
                "(drop the dataset from the list rather than giving it weight 0)"
            )


def _as_number(token: str) -> Optional[float]:
    try:
        return float(token)
    except ValueError:
        return None


def get_blend_from_list(blend: Optional[List[str]], source: str = "--data-path") -> Optional[Blend]:
    """(prefixes, weights or None) from the tokens of a --data-path style list.

    Two forms: prefixes alone (`A B`: weights come later from the datasets' sizes) or weight/prefix pairs
    (`0.3 A 0.7 B`). `source` names the flag in error messages.
    """
    if blend is None:
        return None
    tokens = [str(token).strip() for token in blend if str(token).strip()]  # weights may come as numbers
    if not tokens:
        raise DatasetError(f"{source} is empty: give dataset prefixes (A B) or weight/prefix pairs (0.3 A 0.7 B)")
    if _as_number(tokens[0]) is None:
        stray_numbers = [token for token in tokens if _as_number(token) is not None]
        if stray_numbers:
            raise DatasetError(
                f"{source}: {stray_numbers[0]!r} looks like a weight, but the list starts with the prefix "
                f"{tokens[0]!r}; put each weight before its prefix (0.3 A 0.7 B) or give prefixes alone (A B)"
            )
        return tokens, None
    if len(tokens) % 2 == 1:
        raise DatasetError(
            f"{source} has {len(tokens)} tokens starting with the weight {tokens[0]}: the weighted form needs "
            "WEIGHT PREFIX pairs (0.3 A 0.7 B)"
        )
    weights, prefixes = [], []
    for weight_token, prefix in zip(tokens[0::2], tokens[1::2]):
        weight = _as_number(weight_token)
        if weight is None:
            raise DatasetError(f"{source}: expected a weight before {prefix!r}, got {weight_token!r}")
        if _as_number(prefix) is not None:
            raise DatasetError(f"{source}: expected a dataset prefix after the weight {weight_token}, got {prefix!r}")
        weights.append(weight)
        prefixes.append(prefix)
    check_blend_weights(weights, prefixes, source)
    return prefixes, weights


def compile_helpers() -> None:
    """Megatron-core's call to build the C++ dataset helpers: compiles them if this checkout has no compiled
    module yet (one process per node builds, the others wait); a no-op once built."""
    helpers._build_once_per_node()
