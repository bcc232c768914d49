"""Sample counts and data sources of a training run, from its flags (Megatron-LM semantics)."""

from typing import List, Tuple


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
