"""Throughput of tools/preprocess_data.py: prints documents/s, tokens/s and MB/s on one final line.

Without --input it builds a jsonl of at least --min-mb MB by repeating the ../shared corpora (WikiText-2
paragraphs and Tiny Shakespeare scenes), so runs on different machines measure the same work.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")


def build_corpus(path: str, min_mb: float) -> None:
    """Write a jsonl of the ../shared corpora, repeated until it holds at least `min_mb` megabytes."""
    documents = []
    for name in ("wikitext-2/valid.txt", "wikitext-2/test.txt", "tinyshakespeare/input.txt"):
        with open(os.path.join(SHARED, "data", name), encoding="utf-8") as stream:
            documents += [block for block in re.split(r"\n\s*\n", stream.read()) if block.strip()]
    lines = [json.dumps({"text": document}) + "\n" for document in documents]
    size, target = 0, min_mb * 1e6
    with open(path, "w", encoding="utf-8") as stream:
        while size < target:
            for line in lines:
                stream.write(line)
                size += len(line.encode("utf-8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", help="Input for preprocess_data.py (default: a corpus built from ../shared).")
    parser.add_argument("--min-mb", type=float, default=24.0, help="Size of the built corpus.")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    parser.add_argument("--vocab-file", default=os.path.join(REPO_ROOT, "data/tokenizers/gpt2/vocab.json"))
    parser.add_argument("--merge-file", default=os.path.join(REPO_ROOT, "data/tokenizers/gpt2/merges.txt"))
    parser.add_argument("--tokenizer-model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        source = args.input
        if source is None:
            source = os.path.join(workdir, "corpus.jsonl")
            build_corpus(source, args.min_mb)
        input_mb = os.path.getsize(source) / 1e6 if os.path.isfile(source) else float("nan")
        command = [
            sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"),
            "--input", source, "--output-prefix", os.path.join(workdir, "out"),
            "--tokenizer-type", args.tokenizer_type, "--append-eod",
            "--workers", str(args.workers), "--partitions", str(args.partitions), "--log-interval", "0",
        ]
        for flag in ("vocab_file", "merge_file", "tokenizer_model"):
            if getattr(args, flag):
                command += ["--" + flag.replace("_", "-"), getattr(args, flag)]
        started = time.time()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.time() - started
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        summary = re.search(r"Done: (\d+) documents, (\d+) tokens", result.stdout)
        documents, tokens = int(summary.group(1)), int(summary.group(2))
    print(
        f"preprocess {args.tokenizer_type} workers={args.workers} partitions={args.partitions} input={input_mb:.1f}MB: "
        f"{documents / elapsed:.0f} documents/s, {tokens / elapsed:.0f} tokens/s, {input_mb / elapsed:.2f} MB/s "
        f"(wall {elapsed:.1f}s incl. start-up)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
