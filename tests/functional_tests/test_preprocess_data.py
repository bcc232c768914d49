"""tools/preprocess_data.py and tools/merge_datasets.py run as a user runs them, on WikiText-2."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset
from tests.conftest import REPO_ROOT, shared_path
from tests.reference_tokenizers import ReferenceGPT2BPE

PREPROCESS = str(REPO_ROOT / "tools" / "preprocess_data.py")
MERGE = str(REPO_ROOT / "tools" / "merge_datasets.py")


def run_tool(script, *flags, env=None):
    return subprocess.run(
        [sys.executable, script, *map(str, flags)],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
    )


def gpt2_flags():
    vocab = shared_path("tokenizers/gpt2/vocab.json")
    merges = shared_path("tokenizers/gpt2/merges.txt")
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]


def llama2_flags():
    return ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", shared_path("tokenizers/llama2/tokenizer.model")]


def preprocess(input_path, prefix, *flags, env=None):
    result = run_tool(PREPROCESS, "--input", input_path, "--output-prefix", prefix, "--log-interval", 0, *flags, env=env)
    assert result.returncode == 0, result.stderr
    return f"{prefix}_text_document"


def dataset_bytes(prefix):
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


@pytest.fixture(scope="module")
def paragraphs():
    """WikiText-2 paragraphs (blank-line-separated blocks), plus empty, whitespace-only and non-ASCII documents."""
    text = shared_path("data/wikitext-2/valid.txt").read_text(encoding="utf-8")
    blocks = [block.strip("\n") for block in text.split("\n \n") if block.strip()]
    return blocks[:60] + ["", "naïve café – 東京 😀", " ", "\n\t  \n", ""] + blocks[60:80]


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as stream:
        for text in texts:
            stream.write(json.dumps({"text": text, "id": len(text)}) + "\n")
    return path


def megatron_document(text, tokenize, eod, append_eod):
    """Megatron-LM's preprocess_data.py encoding of one document without --split-sentences: the whole text
    (empty or not) tokenized at once, one sequence unless it encodes to nothing, EOD appended."""
    ids = tokenize(text)
    if ids and append_eod:
        ids = ids + [eod]
    return ids, [len(ids)] if ids else []


REFERENCE_WRITER = """
import json, sys
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
for job in json.load(open(sys.argv[1])):
    builder = IndexedDatasetBuilder(job["prefix"] + ".bin", dtype=DType.optimal_dtype(job["vocab_size"]))
    for ids, lengths in job["documents"]:
        builder.add_document(ids, lengths)
    builder.finalize(job["prefix"] + ".idx")
"""


@pytest.fixture(scope="module")
def megatron_datasets(tmp_path_factory, paragraphs, run_reference_megatron):
    """What Megatron-LM writes for `paragraphs`, per tokenizer and --append-eod: documents tokenized by
    independent references (plain GPT-2 BPE, sentencepiece), written by the published megatron-core."""
    import sentencepiece

    directory = tmp_path_factory.mktemp("megatron")
    gpt2 = ReferenceGPT2BPE(*(shared_path(f"tokenizers/gpt2/{name}") for name in ("vocab.json", "merges.txt")))
    llama = sentencepiece.SentencePieceProcessor(model_file=str(shared_path("tokenizers/llama2/tokenizer.model")))
    tokenizers = {
        "gpt2": (gpt2.encode, 50256, 50257),
        "llama2": (lambda text: [llama.bos_id()] + llama.encode(text), llama.eos_id(), 32000),
    }
    jobs = []
    for name, (tokenize, eod, vocab_size) in tokenizers.items():
        for append_eod in (False, True):
            documents = [megatron_document(text, tokenize, eod, append_eod) for text in paragraphs]
            jobs.append(dict(prefix=str(directory / f"{name}_{append_eod}"), vocab_size=vocab_size, documents=documents))
    (directory / "jobs.json").write_text(json.dumps(jobs))
    run_reference_megatron(REFERENCE_WRITER.replace("sys.argv[1]", repr(str(directory / "jobs.json"))))
    return directory


@pytest.mark.parametrize("tokenizer", ["gpt2", "llama2"])
@pytest.mark.parametrize("append_eod", [False, True])
def test_bytes_equal_megatron(tmp_path, paragraphs, megatron_datasets, tokenizer, append_eod):
    flags = gpt2_flags() if tokenizer == "gpt2" else llama2_flags()
    ours = preprocess(
        write_jsonl(tmp_path / "in.jsonl", paragraphs), tmp_path / "out", *flags, *(["--append-eod"] if append_eod else [])
    )
    assert dataset_bytes(ours) == dataset_bytes(str(megatron_datasets / f"{tokenizer}_{append_eod}"))
    dataset = IndexedDataset(ours)
    assert dataset.index.dtype.__name__ == "uint16"
    assert len(dataset.document_indices) == len(paragraphs) + 1  # an empty text is still a document
    empty = paragraphs.index("")
    first, last = dataset.document_indices[empty : empty + 2]
    if tokenizer == "gpt2":
        assert first == last  # ... with no sequence: GPT-2 BPE encodes "" as nothing
    else:  # Llama 2 prepends BOS even to "": one sequence [BOS] (, EOS)
        assert dataset[int(first)].tolist() == ([1, 2] if append_eod else [1]) and last == first + 1


def test_workers_and_partitions_give_identical_bytes(tmp_path):
    text = shared_path("data/wikitext-2/valid.txt").read_text(encoding="utf-8")
    source = write_jsonl(tmp_path / "valid.jsonl", [block for block in text.split("\n \n") if block.strip()])
    outputs = {
        "workers=1": preprocess(source, tmp_path / "w1", *gpt2_flags(), "--append-eod", "--workers", 1),
        "workers=4": preprocess(source, tmp_path / "w4", *gpt2_flags(), "--append-eod", "--workers", 4),
        "partitions=2": preprocess(source, tmp_path / "p2", *gpt2_flags(), "--append-eod", "--workers", 2, "--partitions", 2),
        "partitions=3": preprocess(source, tmp_path / "p3", *gpt2_flags(), "--append-eod", "--workers", 3, "--partitions", 3),
    }
    expected = dataset_bytes(outputs["workers=1"])
    assert len(expected[0]) > 400_000
    for name, prefix in outputs.items():
        assert dataset_bytes(prefix) == expected, name
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["valid.jsonl"] + [f"{name}_text_document.{suffix}" for name in ("w1", "w4", "p2", "p3") for suffix in ("bin", "idx")]
    )


def test_every_input_format_gives_the_same_dataset(tmp_path, paragraphs):
    # A .txt document is a block of non-blank lines, so keep the paragraphs that are one such block.
    texts = [text for text in paragraphs if text and all(line.strip() for line in text.split("\n"))]
    assert len(texts) > 40
    expected = dataset_bytes(preprocess(write_jsonl(tmp_path / "in.jsonl", texts), tmp_path / "jsonl", *gpt2_flags()))

    with gzip.open(tmp_path / "in.jsonl.gz", "wt", encoding="utf-8") as stream:
        stream.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    (tmp_path / "array.json").write_text(json.dumps([{"text": text} for text in texts]))
    (tmp_path / "in.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"text": texts[:30]}), tmp_path / "a.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"text": texts[30:]}), tmp_path / "b.parquet")
    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    for name in ("a.parquet", "b.parquet"):
        os.rename(tmp_path / name, parquet_dir / name)

    inputs = {
        "gz": tmp_path / "in.jsonl.gz",
        "array": tmp_path / "array.json",
        "txt": tmp_path / "in.txt",
        "directory": parquet_dir,
        "glob": f"{parquet_dir}/*.parquet",
    }
    for name, source in inputs.items():
        assert dataset_bytes(preprocess(source, tmp_path / name, *gpt2_flags())) == expected, name


def test_several_json_keys(tmp_path, paragraphs):
    source = tmp_path / "in.jsonl"
    with open(source, "w") as stream:
        for text in paragraphs[:10]:
            stream.write(json.dumps({"text": text, "title": text[:20]}) + "\n")
    result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", "--json-keys", "text", "title", *gpt2_flags())
    assert result.returncode == 0, result.stderr
    titles = IndexedDataset(str(tmp_path / "out_title_document"))
    assert len(titles.document_indices) == 11
    assert IndexedDataset(str(tmp_path / "out_text_document")).num_tokens > titles.num_tokens


def test_merge_tool_equals_one_shot(tmp_path, paragraphs):
    parts = tmp_path / "parts"
    parts.mkdir()
    preprocess(write_jsonl(tmp_path / "a.jsonl", paragraphs[:40]), parts / "a", *gpt2_flags(), "--append-eod")
    preprocess(write_jsonl(tmp_path / "b.jsonl", paragraphs[40:]), parts / "b", *gpt2_flags(), "--append-eod")
    whole = preprocess(write_jsonl(tmp_path / "all.jsonl", paragraphs), tmp_path / "all", *gpt2_flags(), "--append-eod")
    result = run_tool(MERGE, "--input", parts, "--output-prefix", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert dataset_bytes(str(tmp_path / "merged")) == dataset_bytes(whole)


def test_document_longer_than_a_slice_is_one_sequence(tmp_path):
    """Without --split-sentences Megatron-LM tokenizes a document at once, however long."""
    text = "word " * 250_000
    prefix = preprocess(write_jsonl(tmp_path / "long.jsonl", [text]), tmp_path / "long", *gpt2_flags(), "--append-eod")
    dataset = IndexedDataset(prefix)
    assert dataset.document_indices.tolist() == [0, 1]
    assert dataset.sequence_lengths.tolist() == [250_002]  # "word" + 249,999 x " word" + " " + EOD


def test_split_sentences_reads_long_documents_in_slices(tmp_path):
    """With --split-sentences Megatron-LM splits each 1,000,000-character slice on its own, so a sentence
    never spans two slices."""
    pytest.importorskip("nltk")
    source = write_jsonl(tmp_path / "long.jsonl", ["word " * 250_000])
    result = run_tool(
        PREPROCESS, "--input", source, "--output-prefix", tmp_path / "long", "--log-interval", 0, "--split-sentences",
        *gpt2_flags(), "--append-eod", env={"NLTK_DATA": str(write_punkt_data(tmp_path / "nltk"))},
    )
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(str(tmp_path / "long_text_sentence"))
    assert dataset.document_indices.tolist() == [0, 2]
    assert dataset.sequence_lengths.tolist() == [200_000, 50_001]  # punkt drops the slices' trailing space


def _descendants(pid):
    children = [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _running(pid):
    """Whether `pid` runs (a zombie nobody reaps has finished)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def _kill_parent(parent):
    parent.kill()
    assert parent.wait() == -signal.SIGKILL


def _terminate_group(parent):
    """What torchrun, Slurm and Kubernetes do on a stop: SIGTERM to the whole group, workers included."""
    os.killpg(parent.pid, signal.SIGTERM)
    assert parent.wait(timeout=20) == 128 + signal.SIGTERM


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.parametrize(
    "partitions,stop", [(2, _kill_parent), (1, _terminate_group), (2, _terminate_group)], ids=["kill-parent", "sigterm-group", "sigterm-group-partitions"]
)
def test_a_stop_ends_every_process_and_leaves_nothing(tmp_path, paragraphs, partitions, stop):
    """Partitions stop when their parent dies, even by SIGKILL; tokenizer workers when their parent stops."""
    source = write_jsonl(tmp_path / "in.jsonl", paragraphs * 400)
    flags = ["--input", source, "--output-prefix", tmp_path / "out", "--log-interval", 0, *gpt2_flags(), "--partitions", partitions, "--workers", 4]
    parent = subprocess.Popen([sys.executable, PREPROCESS, *map(str, flags)], start_new_session=True)
    expected = 4 if partitions == 1 else 6  # 4 tokenizer workers, or 2 partitions with 2 each
    writing = ".partition1." if partitions > 1 else ".bin"
    processes = []
    try:
        deadline = time.time() + 60
        while (len(processes) < expected or not any(writing in name for name in os.listdir(tmp_path))) and time.time() < deadline:
            time.sleep(0.05)
            processes = _descendants(parent.pid)
        assert len(processes) == expected and parent.poll() is None, "every process started, output being written"
        stop(parent)
        deadline = time.time() + 5
        while any(map(_running, processes)) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, processes)), "a process outlived the stop"
        assert os.listdir(tmp_path) == ["in.jsonl"]
    finally:
        for pid in [parent.pid, *processes]:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def write_punkt_data(root):
    """A minimal punkt_tab model (no abbreviations or collocations): enough to split at sentence ends."""
    model = root / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).write_text("")
    return root


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences(tmp_path, keep_newlines):
    pytest.importorskip("nltk")
    source = write_jsonl(tmp_path / "in.jsonl", ["The cat sat.\nThe dog ran. It rained.", "One more."])
    flags = ["--split-sentences", *gpt2_flags(), "--append-eod"] + (["--keep-newlines"] if keep_newlines else [])
    result = run_tool(
        PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", *flags,
        env={"NLTK_DATA": str(write_punkt_data(tmp_path / "nltk"))},
    )
    assert result.returncode == 0, result.stderr
    dataset = IndexedDataset(str(tmp_path / "out_text_sentence"))
    assert dataset.document_indices.tolist() == [0, 3, 4]
    from megatron.training.tokenizer import GPT2BPETokenizer

    tokenizer = GPT2BPETokenizer(*(str(shared_path(f"tokenizers/gpt2/{name}")) for name in ("vocab.json", "merges.txt")))
    sentences = [tokenizer.detokenize(dataset[i]) for i in range(len(dataset))]
    if keep_newlines:
        assert sentences == ["The cat sat.\n", "The dog ran. ", "It rained.<|endoftext|>", "One more.<|endoftext|>"]
    else:
        assert sentences == ["The cat sat.", "The dog ran.", "It rained.<|endoftext|>", "One more.<|endoftext|>"]


def test_split_sentences_without_punkt_data_says_how_to_install(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", ["A sentence."])
    result = run_tool(
        PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", "--split-sentences", *gpt2_flags(),
        env={"NLTK_DATA": str(tmp_path / "empty")},
    )
    assert result.returncode == 1
    assert "python -m nltk.downloader punkt_tab" in result.stderr
    assert os.listdir(tmp_path) == ["in.jsonl"]


class TestBadInput:
    """Each bad input: one clear message naming the problem, exit status 1, no output left behind."""

    @pytest.fixture
    def source(self, tmp_path, paragraphs):
        lines = [json.dumps({"text": text}) for text in paragraphs[:300]]
        lines.insert(2, '{"text": "unterminated')
        (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
        return tmp_path / "in.jsonl"

    def assert_fails_cleanly(self, tmp_path, result, message):
        assert result.returncode == 1
        assert message in result.stderr
        assert "Traceback" not in result.stderr
        assert not [name for name in os.listdir(tmp_path) if name.startswith("out")]

    @pytest.mark.parametrize("parallel", [[], ["--workers", 2], ["--workers", 2, "--partitions", 2]])
    def test_malformed_json_line(self, tmp_path, source, parallel):
        result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", *gpt2_flags(), *parallel)
        self.assert_fails_cleanly(tmp_path, result, f"{source}:3: malformed JSON")

    def test_skip_bad_lines_skips_and_counts(self, tmp_path, source, paragraphs):
        result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", *gpt2_flags(), "--skip-bad-lines")
        assert result.returncode == 0, result.stderr
        assert "skipped 1 bad records" in result.stdout
        assert f"skipped {source}:3: malformed JSON" in result.stderr
        clean = preprocess(write_jsonl(tmp_path / "clean.jsonl", paragraphs[:300]), tmp_path / "clean", *gpt2_flags())
        assert dataset_bytes(str(tmp_path / "out_text_document")) == dataset_bytes(clean)

    def test_missing_json_key(self, tmp_path, source):
        result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", "--json-keys", "content", *gpt2_flags())
        self.assert_fails_cleanly(tmp_path, result, f"{source}:1: no key 'content' (keys: text)")

    def test_unknown_tokenizer_type(self, tmp_path, source):
        result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "BPE")
        self.assert_fails_cleanly(tmp_path, result, "unknown --tokenizer-type 'BPE'")

    def test_missing_vocab_file(self, tmp_path, source):
        flags = gpt2_flags()
        flags[flags.index("--vocab-file") + 1] = tmp_path / "vocab.json"
        result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", *flags)
        self.assert_fails_cleanly(tmp_path, result, f"--vocab-file {tmp_path / 'vocab.json'}: no such file")

    def test_missing_input(self, tmp_path):
        result = run_tool(PREPROCESS, "--input", tmp_path / "none.jsonl", "--output-prefix", tmp_path / "out", *gpt2_flags())
        self.assert_fails_cleanly(tmp_path, result, "no such file, directory or glob match")

    def test_unreadable_input(self, tmp_path):
        (tmp_path / "binary.jsonl").write_bytes(b'{"text": "ok"}\n\xff\xfe\x00garbage\n')
        result = run_tool(PREPROCESS, "--input", tmp_path / "binary.jsonl", "--output-prefix", tmp_path / "out", *gpt2_flags())
        self.assert_fails_cleanly(tmp_path, result, "binary.jsonl: not UTF-8 text")

    def test_existing_output_survives_a_failed_run(self, tmp_path, source, paragraphs):
        good = preprocess(write_jsonl(tmp_path / "good.jsonl", paragraphs[:5]), tmp_path / "out", *gpt2_flags())
        before = dataset_bytes(good)
        result = run_tool(PREPROCESS, "--input", source, "--output-prefix", tmp_path / "out", *gpt2_flags())
        assert result.returncode == 1
        assert dataset_bytes(good) == before
        assert sorted(os.listdir(tmp_path)) == ["good.jsonl", "in.jsonl", "out_text_document.bin", "out_text_document.idx"]
