"""Throughput of tools/preprocess_data.py: documents/s and MB/s per tokenizer and worker count, one line each.

Without --input it builds a jsonl of at least --min-mb MB by repeating the ../shared corpora (WikiText-2
paragraphs and Tiny Shakespeare scenes), so runs on different machines measure the same work.

    python bench/preprocess_bench.py --tokenizers GPT2BPETokenizer Llama2Tokenizer SentencePieceTokenizer \
        HuggingFaceTokenizer --workers 1 2 4 --min-mb 8 --megatron-lm-dir /path/to/Megatron-LM

prints one line per tokenizer and worker count; with --megatron-lm-dir (a checkout of core_v0.9.0 or
similar, whose tools/preprocess_data.py imports megatron.training; put its missing pure-Python needs such as
`six` on PYTHONPATH) it also runs Megatron-LM's script on the same input and flags, and prints the speed
ratio and whether the outputs are byte-identical.
"""

import argparse
import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

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


TOKENIZERS = ("GPT2BPETokenizer", "Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer")


def tokenizer_flags(tokenizer_type: str, args, workdir: str) -> List[str]:
    """The tokenizer flags for one type: GPT-2's files, the Llama 2 SentencePiece model, or for
    HuggingFaceTokenizer a fast GPT-2 tokenizer directory saved from the same files."""
    if tokenizer_type == "GPT2BPETokenizer":
        return ["--vocab-file", args.vocab_file, "--merge-file", args.merge_file]
    if tokenizer_type == "HuggingFaceTokenizer":
        directory = os.path.join(workdir, "hf_tokenizer")
        if not os.path.isdir(directory):
            from transformers import GPT2TokenizerFast

            GPT2TokenizerFast(vocab_file=args.vocab_file, merges_file=args.merge_file).save_pretrained(directory)
        return ["--tokenizer-model", directory]
    return ["--tokenizer-model", args.tokenizer_model]


def run_preprocess(script: str, source: str, prefix: str, tokenizer_type: str, flags: List[str], workers: int,
                   partitions: int, env=None) -> Tuple[float, str]:
    """Seconds one preprocess_data.py run takes (start-up included) and its stdout; its output at `prefix`."""
    command = [
        sys.executable, script, "--input", source, "--output-prefix", prefix, "--tokenizer-type", tokenizer_type,
        "--append-eod", "--workers", str(workers), "--partitions", str(partitions), "--log-interval", "1000000",
        *flags,
    ]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(script)))
    elapsed = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def same_bytes(prefix_a: str, prefix_b: str) -> bool:
    return all(filecmp.cmp(prefix_a + suffix, prefix_b + suffix, shallow=False) for suffix in (".bin", ".idx"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="Input for preprocess_data.py (default: a corpus built from ../shared).")
    parser.add_argument("--min-mb", type=float, default=24.0, help="Size of the built corpus.")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Worker counts to run, e.g. 1 2 4.")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--tokenizers", nargs="+", choices=TOKENIZERS, default=["GPT2BPETokenizer"])
    parser.add_argument("--vocab-file", default=os.path.join(REPO_ROOT, "data/tokenizers/gpt2/vocab.json"))
    parser.add_argument("--merge-file", default=os.path.join(REPO_ROOT, "data/tokenizers/gpt2/merges.txt"))
    parser.add_argument("--tokenizer-model", default=os.path.join(SHARED, "tokenizers/llama2/tokenizer.model"))
    parser.add_argument(
        "--megatron-lm-dir",
        help="A Megatron-LM checkout (holding tools/preprocess_data.py and megatron/): also run its script on the "
        "same input, print our speed-up and check the outputs are byte-identical.",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        source = args.input
        if source is None:
            source = os.path.join(workdir, "corpus.jsonl")
            build_corpus(source, args.min_mb)
        input_mb = os.path.getsize(source) / 1e6 if os.path.isfile(source) else float("nan")
        ours_script = os.path.join(REPO_ROOT, "tools", "preprocess_data.py")
        for tokenizer_type in args.tokenizers:
            flags = tokenizer_flags(tokenizer_type, args, workdir)
            for workers in args.workers:
                ours = os.path.join(workdir, "ours")
                elapsed, stdout = run_preprocess(
                    ours_script, source, ours, tokenizer_type, flags, workers, args.partitions
                )
                documents = int(re.search(r"Done: (\d+) documents", stdout).group(1))
                line = (
                    f"preprocess {tokenizer_type} workers={workers} partitions={args.partitions} "
                    f"input={input_mb:.1f}MB: {documents / elapsed:.0f} documents/s, {input_mb / elapsed:.2f} MB/s "
                    f"(wall {elapsed:.1f}s incl. start-up)"
                )
                if args.megatron_lm_dir:
                    theirs = os.path.join(workdir, "theirs")
                    env = dict(os.environ)
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.megatron_lm_dir, env.get("PYTHONPATH")]))
                    their_script = os.path.join(args.megatron_lm_dir, "tools", "preprocess_data.py")
                    their_elapsed, _ = run_preprocess(
                        their_script, source, theirs, tokenizer_type, flags, workers, args.partitions, env
                    )
                    identical = same_bytes(ours + "_text_document", theirs + "_text_document")
                    line += (
                        f" | Megatron-LM {their_elapsed:.1f}s: {their_elapsed / elapsed:.2f}x its speed, "
                        f"output {'byte-identical' if identical else 'DIFFERENT'}"
                    )
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
