"""tools/preprocess_data.py write failures, run in-process: one line each, checked before any tokenizing, and
nothing left behind (a full disk is simulated by OSError(ENOSPC) from the dataset writer)."""

import errno
import json
import os
import re
import subprocess
import sys

import pytest

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tests.conftest import REPO_ROOT, shared_path
from tools import preprocess_data

GPT2 = REPO_ROOT / "data" / "tokenizers" / "gpt2"
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2 / "vocab.json", "--merge-file", GPT2 / "merges.txt"]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "some words " * 40}) + "\n" for i in range(200)))
    return path


def preprocess(source, prefix, capsys, *flags):
    """(exit status, stderr) of preprocess_data.main."""
    status = preprocess_data.main(
        [str(flag) for flag in ["--input", source, "--output-prefix", prefix, "--log-interval", 0, *GPT2_FLAGS, *flags]]
    )
    return status, capsys.readouterr().err


def test_output_folder_that_cannot_exist_is_refused_before_tokenizing(tmp_path, source, capsys, monkeypatch):
    monkeypatch.setattr(preprocess_data, "build_tokenizer", lambda args: pytest.fail("tokenizer built before the check"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    status, error = preprocess(source, blocker / "out", capsys)
    assert status == 1
    assert error == f"error: --output-prefix {blocker / 'out'}: cannot write in {blocker} (a file, not a folder); pick a writable folder\n"


def test_read_only_output_folder_is_refused_before_tokenizing(tmp_path, source, capsys, monkeypatch):
    def denied(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(preprocess_data, "build_tokenizer", lambda args: pytest.fail("tokenizer built before the check"))
    monkeypatch.setattr(preprocess_data.tempfile, "TemporaryFile", denied)  # root writes through chmod 0o555
    status, error = preprocess(source, tmp_path / "out", capsys)
    assert status == 1
    assert error == f"error: --output-prefix {tmp_path / 'out'}: cannot write in {tmp_path} (Permission denied); pick a writable folder\n"


@pytest.mark.parametrize("parallel", [[], ["--partitions", 2, "--workers", 2]])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, source, capsys, monkeypatch, parallel):
    write_tokens = IndexedDatasetBuilder._write_tokens
    written = []

    def until_the_disk_is_full(self, tokens):
        written.append(1)
        if len(written) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_tokens(self, tokens)

    monkeypatch.setattr(IndexedDatasetBuilder, "_write_tokens", until_the_disk_is_full)
    output = tmp_path / "output"
    status, error = preprocess(source, output / "data", capsys, *parallel)
    assert status == 1
    assert re.fullmatch(
        rf"error: no space left on {output} \(needs ~\d+\.\d GB for the output; No space left on device\); "
        r"free space there or pick another --output-prefix\n",
        error,
    ), error
    assert os.listdir(output) == []


def test_preprocessing_with_sentencepiece_never_imports_torch(tmp_path):
    """Importing torch costs over a second before the first document, and neither the writer nor the tokenizers
    need it (megatron.core and megatron.training import their top-level names lazily)."""
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} of a small test set"}) + "\n" for i in range(20)))
    argv = ["tools/preprocess_data.py", "--input", str(source), "--output-prefix", str(tmp_path / "out"),
            "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(shared_path("tokenizers/llama2/tokenizer.model")),
            "--append-eod", "--workers", "2"]
    script = (
        f"import runpy, sys\nsys.argv = {argv!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch imported: False" in result.stdout
    tokens = int(re.search(r"20 documents, (\d+) tokens", result.stdout).group(1))
    assert (tmp_path / "out_text_document.bin").stat().st_size == 2 * tokens > 2 * 20 * 9  # uint16 ids
