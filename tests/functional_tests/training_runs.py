"""Helpers of the training functional tests: a tiny dataset from the bundled WikiText-2 sample, tiny model
flags for both stacks, and running pretrain_gpt.py as a user does (plain python or torchrun)."""

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, free_port


def require_data_pipeline():
    """Skip (with the reason) until megatron.training.datasets, which pretrain_gpt.py trains from, exists."""
    pytest.importorskip(
        "megatron.training.datasets",
        reason="pretrain_gpt.py needs the megatron.training.datasets package (datasets provider and loader)",
    )

PRETRAIN = str(REPO_ROOT / "pretrain_gpt.py")
GPT2_VOCAB = REPO_ROOT / "data" / "tokenizers" / "gpt2" / "vocab.json"
GPT2_MERGES = REPO_ROOT / "data" / "tokenizers" / "gpt2" / "merges.txt"
WIKITEXT_SAMPLE = REPO_ROOT / "data" / "wikitext-2-sample" / "wiki.valid.sample.txt"

LLAMA_TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2",
    "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--seq-length", "32", "--max-position-embeddings", "32",
]
STACKS = {"mcore": ["--use-mcore-models"], "legacy": ["--use-legacy-models"]}


def gpt2_dataset(directory) -> str:
    """The bundled WikiText-2 sample tokenized with GPT-2 BPE; returns the --data-path prefix."""
    prefix = os.path.join(directory, "wiki")
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "tools" / "preprocess_data.py"),
            "--input", str(WIKITEXT_SAMPLE), "--output-prefix", prefix,
            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_VOCAB), "--merge-file", str(GPT2_MERGES),
            "--append-eod", "--workers", "1", "--log-interval", "0",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return prefix + "_text_document"


def training_flags(data_path, stack="mcore", *extra, model=LLAMA_TINY):
    """A complete command line for a tiny model (Llama-style unless `model` gives other model flags) on the
    GPT-2-tokenized sample."""
    return [
        *STACKS[stack], *model,
        "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_VOCAB), "--merge-file", str(GPT2_MERGES),
        "--data-path", data_path, "--split", "98,1,1",
        "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "1e-2", "--min-lr", "1e-3", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--weight-decay", "0.1", "--adam-beta2", "0.95", "--clip-grad", "1.0",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
        "--device", "cpu", "--seed", "1234",
        *map(str, extra),
    ]


def command(flags, nproc=1, script=PRETRAIN):
    """pretrain_gpt.py (or another training script) as plain python (nproc 1) or under torchrun on loopback."""
    flags = [str(flag) for flag in flags]
    if nproc == 1:
        return [sys.executable, str(script), *flags]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script), *flags,
    ]


def _environment():
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=python_path)


def run_pretrain(flags, nproc=1, timeout=600, script=PRETRAIN):
    """Run to completion; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(
        command(flags, nproc, script), capture_output=True, text=True, env=_environment(), timeout=timeout, cwd=REPO_ROOT
    )


def run_until(flags, pattern, sig, nproc=1, timeout=600, send=None):
    """Start a run, send `sig` (by default to the training processes, see `signal_trainers`; `send(process,
    sig, nproc)` chooses others) once a stdout line matches `pattern`, and return (returncode, stdout)."""
    process = subprocess.Popen(
        command(flags, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_environment(), cwd=REPO_ROOT, start_new_session=True,
    )
    lines = []
    signalled = False
    try:
        for line in process.stdout:
            lines.append(line)
            if not signalled and re.search(pattern, line):
                (send or signal_trainers)(process, sig, nproc)
                signalled = True
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert signalled, "".join(lines)
    return process.returncode, "".join(lines)


def _children(pid):
    return [int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]


def signal_trainers(process, sig, nproc):
    """Signal the training processes only (torchrun's workers run in sessions of their own), and with SIGKILL
    torchrun too, as when a node dies."""
    if nproc == 1:
        os.kill(process.pid, sig)
        return
    for pid in _children(process.pid):
        os.kill(pid, sig)
    if sig == signal.SIGKILL:
        os.kill(process.pid, sig)


def signal_process_groups(process, sig, nproc):
    """Signal each training process's whole process group, its DataLoader workers included, as Slurm and
    Kubernetes do (torchrun starts every worker in a session of its own)."""
    for pid in _children(process.pid) if nproc > 1 else [process.pid]:
        os.killpg(pid, sig)


def signal_launcher(process, sig, nproc):
    """Signal torchrun alone; it forwards the signal to each worker's process group (DataLoader workers
    included), waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s) and then exits non-zero itself."""
    os.kill(process.pid, sig)


ITERATION_LINE = re.compile(r"^ iteration\s+(\d+)/\s*\d+ \|.*$", re.MULTILINE)
TIMING_FIELDS = re.compile(r" (elapsed time per iteration \(ms\)|throughput per GPU \(TFLOP/s/GPU\)|throughput \(tokens/s\)): [\d.]+ \|")


def iteration_records(stdout):
    """{iteration: the log line without its timing fields} for every training log line."""
    return {int(match.group(1)): TIMING_FIELDS.sub("", match.group(0)) for match in ITERATION_LINE.finditer(stdout)}


def lm_losses(stdout):
    return {iteration: float(re.search(r"lm loss: (\S+) \|", line).group(1)) for iteration, line in iteration_records(stdout).items()}
