"""Sample counts and blends of a training run, from its flags (Megatron-LM semantics)."""

import json
from typing import List, Optional, Tuple

from megatron.core.datasets.utils import Blend, DatasetError, Split, get_blend_from_list


def get_train_valid_test_num_samples(args) -> Tuple[int, int, int]:
    """(train, valid, test) sample counts: the training length, every evaluation, and one final test."""
    if args.train_samples:
        train_samples = args.train_samples
    else:
        train_samples = args.train_iters * args.global_batch_size
    eval_iters = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    test_iters = args.eval_iters
    return train_samples, eval_iters * args.global_batch_size, test_iters * args.global_batch_size


def data_sources(args) -> List[str]:
    """The data flags given, among the mutually exclusive ways to name the training data."""
    per_split_paths = (args.train_data_path, args.valid_data_path, args.test_data_path)
    given = (
        ("--mock-data", args.mock_data),
        ("--data-path", args.data_path is not None),
        ("--data-args-path", args.data_args_path is not None),
        ("--train/valid/test-data-path", any(path is not None for path in per_split_paths)),
        ("--per-split-data-args-path", args.per_split_data_args_path is not None),
    )
    return [flag for flag, present in given if present]


def _tokens(values: Optional[List[str]]) -> Optional[List[str]]:
    """Flag values split at whitespace, so a quoted "0.3 A 0.7 B" reads like the unquoted tokens."""
    if values is None:
        return None
    return [token for value in values for token in value.split()]


def _read(path: str, flag: str) -> str:
    try:
        with open(path) as stream:
            return stream.read()
    except OSError as error:
        raise DatasetError(f"{flag} {path}: cannot read the file ({error.strerror})") from None


def get_blend_and_blend_per_split(args) -> Tuple[Optional[Blend], Optional[List[Optional[Blend]]]]:
    """(blend shared by the splits, per-split blends) from --data-path / --data-args-path or the per-split flags."""
    if args.data_path is not None:
        return get_blend_from_list(_tokens(args.data_path), "--data-path"), None
    if args.data_args_path is not None:
        tokens = _read(args.data_args_path, "--data-args-path").split()
        return get_blend_from_list(tokens, f"--data-args-path {args.data_args_path}"), None
    if args.per_split_data_args_path is not None:
        path = args.per_split_data_args_path
        try:
            per_split = json.loads(_read(path, "--per-split-data-args-path"))
        except json.JSONDecodeError as error:
            raise DatasetError(f"--per-split-data-args-path {path} is not valid JSON: {error}") from None
        if not isinstance(per_split, dict) or not set(per_split) <= {split.name for split in Split}:
            raise DatasetError(
                f'--per-split-data-args-path {path} must be an object with keys "train", "valid", "test"'
            )
        blends = []
        for split in Split:
            value = per_split.get(split.name)
            tokens = None if value is None else _tokens([value] if isinstance(value, str) else value)
            blends.append(get_blend_from_list(tokens, f"{split.name} in {path}"))
        return None, blends
    per_split_paths = (args.train_data_path, args.valid_data_path, args.test_data_path)
    if any(path is not None for path in per_split_paths):
        return None, [
            get_blend_from_list(_tokens(path), f"--{split.name}-data-path")
            for split, path in zip(Split, per_split_paths)
        ]
    return None, None
