"""GPT dataset speed: prints the seconds to build the shuffle and blending indices of a two-dataset blend of
--blend-samples samples, then the sustained samples/s of reading --seq-length samples from a synthetic
.bin/.idx (written to a temporary folder with IndexedDatasetBuilder), then what the checks at build cost on a
--check-gigabytes .bin: opening it (the .idx layout check and digest) and the token id scan against the
vocabulary, first (scanning) and again (cached); one figure per line.

Memory stays near 2 GB at the defaults (uint32 shuffle indices, int16 + int64 blending arrays).
"""

import argparse
import tempfile
import time
import types

import numpy

from megatron.core.datasets import helpers
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, _build_shuffle_index
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

EOD = 0


def time_blend_indices(num_samples: int, weights) -> float:
    """Seconds to shuffle each dataset's share of the samples and to blend them (the work that grows with
    the number of samples; the document and sample indices grow with tokens instead)."""
    random_state = numpy.random.RandomState(1234)
    start = time.perf_counter()
    for weight in weights:
        share = int(numpy.ceil(weight * num_samples))
        _build_shuffle_index(share, share, random_state)
    dataset_index = numpy.empty(num_samples, dtype=numpy.int16)
    dataset_sample_index = numpy.empty(num_samples, dtype=numpy.int64)
    helpers.build_blending_indices(
        dataset_index, dataset_sample_index, numpy.asarray(weights, dtype=numpy.float64), len(weights), num_samples, False
    )
    return time.perf_counter() - start


def write_synthetic_dataset(prefix: str, num_tokens: int, mean_document_tokens: int) -> None:
    """Documents of random lengths holding random token ids below 50000, each ending with EOD."""
    rng = numpy.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    written = 0
    while written < num_tokens:
        lengths = rng.integers(2, 2 * mean_document_tokens, size=1000)
        tokens = rng.integers(1, 50000, size=int(lengths.sum()), dtype=numpy.uint16)
        tokens[numpy.cumsum(lengths) - 1] = EOD
        for document, length in zip(numpy.split(tokens, numpy.cumsum(lengths)[:-1]), lengths):
            builder.add_document(document, [int(length)])
        written += int(lengths.sum())
    builder.finalize(prefix + ".idx")


def samples_per_second(prefix: str, cache: str, seq_length: int, num_samples: int) -> float:
    """Sustained rate of dataset[i] over num_samples samples in the dataset's shuffled order."""
    tokenizer = types.SimpleNamespace(eod=EOD, pad=None, vocab_size=50257)
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq_length, blend=([prefix], None), split="1,0,0",
        path_to_cache=cache, tokenizer=tokenizer,
    )
    dataset = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()[0]
    for idx in range(min(32, len(dataset))):  # warm the page cache and the cached masks
        dataset[idx]
    start = time.perf_counter()
    for idx in range(num_samples):
        dataset[idx]
    return num_samples / (time.perf_counter() - start)


def write_large_dataset(prefix: str, gigabytes: float, mean_document_tokens: int = 600) -> int:
    """uint16 random token ids, written in 64 MB batches of documents; returns the number of documents."""
    rng = numpy.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    tokens_left, documents = int(gigabytes * 2**30) // 2, 0
    while tokens_left > 0:
        tokens = rng.integers(0, 50000, size=min(tokens_left, 2**25), dtype=numpy.uint16)
        lengths = numpy.diff(numpy.unique(numpy.concatenate([[0], rng.integers(1, tokens.size, tokens.size // mean_document_tokens), [tokens.size]])))
        builder.add_document(tokens, lengths.tolist())
        tokens_left -= tokens.size
        documents += lengths.size
    builder.finalize(prefix + ".idx")
    return documents


def time_checks_at_build(prefix: str, cache: str) -> tuple:
    """Seconds to open the dataset (layout check, digest), to scan its token ids, and to read them cached."""
    config = types.SimpleNamespace(mmap_bin_files=True, vocab_size=50257, path_to_cache=cache, shared_storage=True)
    start = time.perf_counter()
    dataset = IndexedDataset(prefix)
    dataset.content_digest
    opened = time.perf_counter()
    GPTDataset.build_low_level_dataset(prefix, config)
    scanned = time.perf_counter()
    GPTDataset.build_low_level_dataset(prefix, config)
    return opened - start, scanned - opened, time.perf_counter() - scanned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blend-samples", type=int, default=10**8)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--read-samples", type=int, default=4000)
    parser.add_argument("--dataset-tokens", type=int, default=40 * 10**6, help="Tokens of the synthetic dataset.")
    parser.add_argument("--check-gigabytes", type=float, default=1.0, help="Size of the .bin the checks run on (0 skips).")
    args = parser.parse_args()

    seconds = time_blend_indices(args.blend_samples, [0.3, 0.7])
    print(f"blend index build (shuffle + blending, 2 datasets, {args.blend_samples:.3g} samples): {seconds:.2f} s")
    with tempfile.TemporaryDirectory() as workdir:
        write_synthetic_dataset(f"{workdir}/synthetic", args.dataset_tokens, mean_document_tokens=600)
        rate = samples_per_second(f"{workdir}/synthetic", f"{workdir}/cache", args.seq_length, args.read_samples)
    print(f"sustained read (seq_length={args.seq_length}, {args.read_samples} samples): {rate:.0f} samples/s")
    if args.check_gigabytes > 0:
        with tempfile.TemporaryDirectory() as workdir:
            documents = write_large_dataset(f"{workdir}/large", args.check_gigabytes)
            opening, scan, cached = time_checks_at_build(f"{workdir}/large", f"{workdir}/cache")
        print(f"checks at build ({args.check_gigabytes:g} GB .bin, {documents} documents, in the page cache): "
              f"open {opening:.2f} s, token id scan {scan:.2f} s, cached {cached * 1000:.1f} ms")


if __name__ == "__main__":
    main()
