"""Turn raw text into Megatron .bin/.idx datasets: PREFIX_{key}_document.bin/.idx per --json-keys entry.

Input: a file, a glob or a directory of .jsonl / .json / .jsonl.gz / .parquet / .txt (in a .txt file each
blank-line-separated block is one document). Output bytes equal Megatron-LM's preprocess_data.py for the
same input, tokenizer and flags, whatever --workers and --partitions are.
"""

import argparse
import contextlib
import ctypes
import errno
import glob
import gzip
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import (  # noqa: E402
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
    merge_datasets,
)
from megatron.training.tokenizer.arguments import add_tokenizer_args  # noqa: E402
from megatron.training.tokenizer import build_tokenizer  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from tools.ordered_worker_pool import OrderedWorkerPool, WorkerDied  # noqa: E402

# With --split-sentences Megatron-LM hands text to the sentence splitter in slices of this many characters
# (a sentence never spans two); without it the whole text is tokenized at once, even when it is empty.
_TEXT_SLICE_CHARS = 1_000_000
_INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".txt")


class PreprocessError(UserError):
    """Bad input or flags: printed as one line, exit status 1, no output left behind."""


# ----------------------------------------------------------------------------------------------- input


def resolve_inputs(pattern: str) -> List[str]:
    """The input files, sorted: one file, every match of a glob, or every supported file in a directory."""
    if os.path.isdir(pattern):
        paths = [os.path.join(pattern, name) for name in os.listdir(pattern)]
        paths = [path for path in paths if os.path.isfile(path) and path.endswith(_INPUT_SUFFIXES)]
    elif os.path.isfile(pattern):
        paths = [pattern]
    else:
        paths = [path for path in glob.glob(pattern) if os.path.isfile(path)]
    if not paths:
        raise PreprocessError(f"--input {pattern}: no such file, directory or glob match")
    for path in paths:
        if not path.endswith(_INPUT_SUFFIXES):
            raise PreprocessError(f"--input {path}: unsupported file type; use one of {', '.join(_INPUT_SUFFIXES)}")
        if not os.access(path, os.R_OK):
            raise PreprocessError(f"--input {path}: not readable (check its permissions)")
    return sorted(paths)


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def _iter_json_lines(path: str) -> Iterator[Tuple[str, object]]:
    with _open_text(path) as stream:
        first = stream.read(1)
        while first.isspace():
            first = stream.read(1)
        if first == "[":  # a .json file holding one array of records
            try:
                records = json.loads(first + stream.read())
            except json.JSONDecodeError as error:
                raise PreprocessError(f"{path}: malformed JSON array ({error})") from None
            for position, record in enumerate(records):
                yield f"{path}[{position}]", record
            return
        stream.seek(0)
        for line_number, line in enumerate(stream, start=1):
            if line.strip():
                yield f"{path}:{line_number}", line


def _iter_text_blocks(path: str) -> Iterator[Tuple[str, object]]:
    with _open_text(path) as stream:
        block: List[str] = []
        block_start = 0
        for line_number, line in enumerate(stream, start=1):
            if line.strip():
                if not block:
                    block_start = line_number
                block.append(line)
            elif block:
                yield f"{path}:{block_start}", {"text": "".join(block).rstrip("\n")}
                block = []
        if block:
            yield f"{path}:{block_start}", {"text": "".join(block).rstrip("\n")}


def _iter_parquet_rows(path: str, json_keys: List[str]) -> Iterator[Tuple[str, object]]:
    import pyarrow.parquet

    try:
        parquet_file = pyarrow.parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for unreadable files
        raise PreprocessError(f"{path}: not a readable parquet file ({error})") from None
    missing = [key for key in json_keys if key not in parquet_file.schema_arrow.names]
    if missing:
        raise PreprocessError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(parquet_file.schema_arrow.names)}); "
            "pick the text column with --json-keys"
        )
    row = 0
    for batch in parquet_file.iter_batches(columns=json_keys):
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def iter_records(paths: List[str], json_keys: List[str]) -> Iterator[Tuple[str, object]]:
    """(location, record) for every document: a raw JSON line (parsed by the workers) or a dict."""
    for path in paths:
        try:
            if path.endswith(".parquet"):
                yield from _iter_parquet_rows(path, json_keys)
            elif path.endswith(".txt"):
                yield from _iter_text_blocks(path)
            else:
                yield from _iter_json_lines(path)
        except UnicodeDecodeError as error:
            raise PreprocessError(f"{path}: not UTF-8 text ({error})") from None
        except (OSError, EOFError) as error:
            raise PreprocessError(f"{path}: cannot be read ({error})") from None


def count_records(paths: List[str], json_keys: List[str]) -> int:
    return sum(1 for _ in iter_records(paths, json_keys))


# -------------------------------------------------------------------------------------------- encoding


@dataclass
class BadRecord:
    location: str
    reason: str


def _build_sentence_splitter(args):
    """nltk punkt for --split-sentences (None without it); --keep-newlines keeps line breaks in sentences."""
    if not args.split_sentences:
        return None
    try:
        import nltk
        from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer, PunktTokenizer
    except ImportError:
        raise PreprocessError("--split-sentences needs nltk: pip install nltk") from None
    try:
        punkt = PunktTokenizer(args.lang)
    except LookupError:
        raise PreprocessError(
            f"--split-sentences needs nltk's punkt data for {args.lang!r}: run "
            "`python -m nltk.downloader punkt_tab` (or point NLTK_DATA at a folder holding tokenizers/punkt_tab)"
        ) from None
    if not args.keep_newlines:
        return punkt

    class NewlineKeepingLanguageVars(PunktLanguageVars):
        # The whitespace after a sentence end belongs to that sentence, so newlines survive the split.
        _period_context_fmt = r"""
            \S*
            %(SentEndChars)s
            \s*
            (?=(?P<after_tok>
                %(NonWord)s
                |
                (?P<next_tok>\S+)
            ))"""

    del nltk
    return PunktSentenceTokenizer(train_text=punkt._params, lang_vars=NewlineKeepingLanguageVars())


class Encoder:
    """Tokenizes one record per call; built once in each worker process."""

    def __init__(self, args) -> None:
        self.args = args

    def initializer(self) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        Encoder.tokenizer = build_tokenizer(self.args)
        Encoder.dtype = DType.optimal_dtype(Encoder.tokenizer.vocab_size)
        Encoder.splitter = _build_sentence_splitter(self.args)

    def _sentences(self, text: str) -> List[str]:
        """The pieces tokenized one by one: the text itself (an empty text too, which tokenizers that prepend
        BOS encode as [BOS]), or its sentences."""
        if Encoder.splitter is None:
            return [text]
        slices = [text[start : start + _TEXT_SLICE_CHARS] for start in range(0, len(text), _TEXT_SLICE_CHARS)]
        return [sentence for piece in slices for sentence in Encoder.splitter.tokenize(piece)]

    def encode(self, json_line):
        """Megatron-LM's call: one JSON line -> (ids per key, sequence lengths per key, input bytes); a bad
        line raises ValueError with the reason."""
        result = self.encode_record((None, json_line))
        if isinstance(result, BadRecord):
            raise ValueError(result.reason)
        return result

    def encode_record(self, item):
        """(location, record) -> (ids per key, sequence lengths per key, input bytes) or a BadRecord."""
        location, record = item
        size = len(record.encode("utf-8")) if isinstance(record, str) else 0
        if isinstance(record, str):
            try:
                record = json.loads(record)
            except json.JSONDecodeError as error:
                return BadRecord(location, f"malformed JSON ({error.msg} at column {error.colno})")
        if not isinstance(record, dict):
            return BadRecord(location, f"expected a JSON object, got {type(record).__name__}")
        ids, lengths = {}, {}
        for key in self.args.json_keys:
            if key not in record:
                return BadRecord(
                    location, f"no key {key!r} (keys: {', '.join(map(str, record))}); pick the field with --json-keys"
                )
            text = record[key]
            if not isinstance(text, str):
                return BadRecord(location, f"value of {key!r} is {type(text).__name__}, not text")
            if not size:
                size += len(text.encode("utf-8"))
            document_ids: List[int] = []
            sentence_lengths: List[int] = []
            for sentence in self._sentences(text):
                sentence_ids = Encoder.tokenizer.tokenize(sentence)
                if sentence_ids:
                    document_ids.extend(sentence_ids)
                    sentence_lengths.append(len(sentence_ids))
            if document_ids and self.args.append_eod:
                document_ids.append(Encoder.tokenizer.eod)
                sentence_lengths[-1] += 1
            ids[key], lengths[key] = document_ids, sentence_lengths
        return ids, lengths, size

    def encode_record_as_arrays(self, item):
        """encode_record in a worker process: the token ids as numpy arrays of the dataset's dtype, which cross
        the pipe to the writer as raw bytes instead of one pickled int each."""
        result = self.encode_record(item)
        if isinstance(result, BadRecord):
            return result
        ids, lengths, size = result
        return {key: numpy.array(document_ids, dtype=Encoder.dtype) for key, document_ids in ids.items()}, lengths, size


# ---------------------------------------------------------------------------------------------- output


def output_prefix(args, key: str) -> str:
    level = "sentence" if args.split_sentences else "document"
    return f"{args.output_prefix}_{key}_{level}"


@dataclass
class Progress:
    """Counts and rates for the progress log and the final summary."""

    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped: List[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def rates(self) -> str:
        elapsed = max(time.time() - self.started, 1e-9)
        return (
            f"{self.documents} documents, {self.tokens} tokens, {self.input_bytes / 1e6:.2f} MB in {elapsed:.2f} s "
            f"({self.documents / elapsed:.1f} docs/s, {self.tokens / elapsed:.0f} tokens/s, "
            f"{self.input_bytes / elapsed / 1e6:.2f} MB/s)"
        )


def encode_range(args, paths: List[str], start: int, stop: Optional[int], prefixes: Dict[str, str], workers: int, label: str):
    """Tokenize records [start, stop) of the input into one dataset per key at `prefixes[key]`."""
    encoder = Encoder(args)
    encoder.initializer()
    dtype = DType.optimal_dtype(Encoder.tokenizer.vocab_size)
    builders = {key: IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype) for key, prefix in prefixes.items()}
    progress = Progress()
    records = _take(iter_records(paths, args.json_keys), start, stop)
    try:
        pool = OrderedWorkerPool(workers, encoder.initializer, encoder.encode_record_as_arrays) if workers > 1 else None
        with pool or contextlib.nullcontext():
            encoded = pool.map(records) if pool else map(encoder.encode_record, records)
            for result in encoded:
                if isinstance(result, BadRecord):
                    if not args.skip_bad_lines:
                        raise PreprocessError(f"{result.location}: {result.reason} (--skip-bad-lines skips such records)")
                    progress.skipped.append(f"{result.location}: {result.reason}")
                    continue
                ids, lengths, size = result
                for key, builder in builders.items():
                    builder.add_document(ids[key], lengths[key])
                    progress.tokens += len(ids[key])
                progress.documents += 1
                progress.input_bytes += size
                if args.log_interval and progress.documents % args.log_interval == 0:
                    print(f"{label}processed {progress.rates()}", file=sys.stderr, flush=True)
        for key, builder in builders.items():
            builder.finalize(get_idx_path(prefixes[key]))
    except BaseException as error:
        for builder in builders.values():
            builder.abort()
        if isinstance(error, WorkerDied):
            raise PreprocessError(f"{label}tokenizer {error}") from None
        raise_if_disk_full(error, args, _estimated_output_bytes(args, paths, progress, numpy.dtype(dtype).itemsize))
        raise
    return progress


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def raise_if_disk_full(error: BaseException, args, needed_bytes: float) -> None:
    """A full disk (or a file-size or quota limit) as one line naming the folder and the space the output
    needs; the temporary files are already gone."""
    if not isinstance(error, OSError) or error.errno not in _DISK_FULL:
        return
    folder = os.path.dirname(os.path.abspath(args.output_prefix))
    raise PreprocessError(
        f"no space left on {folder} (needs ~{needed_bytes / 2**30:.1f} GB for the output; {error.strerror}); "
        "free space there or pick another --output-prefix"
    ) from None


def _estimated_output_bytes(args, paths: List[str], progress: Progress, bytes_per_token: int) -> float:
    """The input size times the output/input ratio seen so far (about 4 input bytes per token before any),
    per --json-keys entry, twice with --partitions (the parts and the merged copy coexist)."""
    ratio = progress.tokens * bytes_per_token / progress.input_bytes if progress.tokens else bytes_per_token / 4
    input_bytes = sum(os.path.getsize(path) for path in paths)
    return input_bytes * ratio * len(args.json_keys) * (2 if args.partitions > 1 else 1)


def _take(records, start: int, stop: Optional[int]):
    for position, record in enumerate(records):
        if stop is not None and position >= stop:
            return
        if position >= start:
            yield record


def _partition_main(args, paths, start, stop, prefixes, workers, label, results, parent_pid) -> None:
    """Entry of one --partitions process: reports its Progress or its error message to the parent, and
    stops, leaving no files, as soon as the parent dies (even by SIGKILL)."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    _terminate_when_parent_dies(parent_pid)
    try:
        results.put((label, encode_range(args, paths, start, stop, prefixes, workers, label)))
    except PreprocessError as error:
        results.put((label, str(error)))
    except Exception as error:  # report anything else instead of leaving the parent waiting
        results.put((label, f"{type(error).__name__}: {error}"))
    except BaseException:
        for prefix in prefixes.values():
            _remove_dataset(prefix)
        raise


def _exit_on_signal(signum, frame) -> None:
    """SIGTERM unwinds like an exception, so the `finally` and `except` blocks remove temporary files."""
    raise SystemExit(128 + signum)


_PR_SET_PDEATHSIG = 1


def _terminate_when_parent_dies(parent_pid: int) -> None:
    """SIGTERM this process when `parent_pid` exits: the kernel sends it on Linux (prctl PR_SET_PDEATHSIG),
    elsewhere a thread polls the parent id."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is None or libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _poll_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)


def _dataset_files(prefix: str) -> Tuple[str, str]:
    return get_bin_path(prefix), get_idx_path(prefix)


def _remove_dataset(prefix: str) -> None:
    for path in _dataset_files(prefix):
        if os.path.exists(path):
            os.remove(path)


def encode_partitioned(args, paths: List[str]) -> Progress:
    """Split the records into --partitions contiguous ranges, encode them in parallel, merge in order."""
    progress = Progress()
    total = count_records(paths, args.json_keys)
    per_partition = -(-total // args.partitions)
    workers = max(1, args.workers // args.partitions)
    part_prefixes = [
        {key: f"{output_prefix(args, key)}.partition{index}.tmp{os.getpid()}" for key in args.json_keys}
        for index in range(args.partitions)
    ]
    results = multiprocessing.Queue()
    processes = []
    for index in range(args.partitions):
        start, stop = index * per_partition, min(total, (index + 1) * per_partition)
        process = multiprocessing.Process(
            target=_partition_main,
            args=(args, paths, start, stop, part_prefixes[index], workers, f"[partition {index}] ", results, os.getpid()),
        )
        process.start()
        processes.append(process)
    try:
        reports = dict(results.get() for _ in processes)
        for process in processes:
            process.join()
        errors = [report for report in reports.values() if isinstance(report, str)]
        if errors:
            raise PreprocessError(errors[0])
        for report in reports.values():
            progress.documents += report.documents
            progress.tokens += report.tokens
            progress.input_bytes += report.input_bytes
            progress.skipped += report.skipped
        try:
            for key in args.json_keys:
                merge_datasets([prefixes[key] for prefixes in part_prefixes], output_prefix(args, key))
        except OSError as error:
            parts = [path for prefixes in part_prefixes for prefix in prefixes.values() for path in _dataset_files(prefix)]
            raise_if_disk_full(error, args, sum(os.path.getsize(path) for path in parts if os.path.exists(path)))
            raise
        return progress
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for prefixes in part_prefixes:
            for prefix in prefixes.values():
                _remove_dataset(prefix)


# ------------------------------------------------------------------------------------------------ main


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="A file, a glob, or a directory of input files.")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="Fields to extract (one dataset each).")
    group.add_argument("--split-sentences", action="store_true", help="One sequence per sentence (nltk punkt).")
    group.add_argument("--keep-newlines", action="store_true", help="Keep newlines between sentences when splitting.")
    group.add_argument("--lang", type=str, default="english", help="Language of the nltk sentence splitter.")
    group.add_argument(
        "--skip-bad-lines", action="store_true", help="Skip malformed records and report them at the end."
    )
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="tokenization")
    group.add_argument("--append-eod", action="store_true", help="Append the end-of-document token to each document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True, help="Path prefix of the output files.")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="Tokenizer processes (split among partitions).")
    group.add_argument("--partitions", type=int, default=1, help="Encode the input as this many parts, then merge.")
    group.add_argument("--log-interval", type=int, default=1000, help="Report progress every this many documents.")
    args = parser.parse_args(argv)
    if args.tokenizer_type is None:
        parser.error("--tokenizer-type is required")
    if args.workers < 1 or args.partitions < 1:
        parser.error("--workers and --partitions must be at least 1")
    return args


def check_output_folder(output_prefix: str) -> None:
    """Create the --output-prefix folder and write a probe file there, before any tokenizing."""
    folder = os.path.dirname(os.path.abspath(output_prefix))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = "a file, not a folder" if os.path.isfile(folder) else error.strerror
        raise PreprocessError(
            f"--output-prefix {output_prefix}: cannot write in {folder} ({reason}); pick a writable folder"
        ) from None


def main(argv=None) -> int:
    args = get_args(argv)
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        paths = resolve_inputs(args.input)
        check_output_folder(args.output_prefix)
        build_tokenizer(args)  # fail fast, in this process, on a bad tokenizer flag or file
        _build_sentence_splitter(args)
        if args.partitions == 1:
            prefixes = {key: output_prefix(args, key) for key in args.json_keys}
            progress = encode_range(args, paths, 0, None, prefixes, args.workers, "")
        else:
            progress = encode_partitioned(args, paths)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    for skipped in progress.skipped:
        print(f"skipped {skipped}", file=sys.stderr)
    print(f"Done: {progress.rates()}; skipped {len(progress.skipped)} bad records")
    for key in args.json_keys:
        print(f"wrote {output_prefix(args, key)}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
