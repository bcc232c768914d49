"""Merge every dataset (PREFIX.bin + PREFIX.idx pair) in a folder into one, in sorted prefix order."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import merge_datasets  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402


def dataset_prefixes(directory: str):
    """Sorted prefixes in `directory` that have both a .bin and a .idx file."""
    names = set(os.listdir(directory))
    prefixes = [name[: -len(".idx")] for name in names if name.endswith(".idx") and name[:-4] + ".bin" in names]
    return [os.path.join(directory, prefix) for prefix in sorted(prefixes)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--input", type=str, required=True, help="Folder holding the datasets to merge.")
    parser.add_argument("--output-prefix", type=str, required=True, help="Prefix of the merged dataset.")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.input):
        print(f"error: --input {args.input} is not a directory", file=sys.stderr)
        return 1
    prefixes = dataset_prefixes(args.input)
    if not prefixes:
        print(f"error: --input {args.input} holds no .bin/.idx pairs", file=sys.stderr)
        return 1
    try:
        merge_datasets(prefixes, args.output_prefix)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
