"""Shared fixtures: the ../shared data and tokenizers, and the reference Megatron-core install."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEGATRON_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_MEGATRON = Path(
    os.environ.get("MEGATRON_REFERENCE_PATH", REPO_ROOT / ".ci" / "reference" / "megatron_core")
)


def shared_path(relative: str) -> Path:
    """A file under ../shared, or skip the test with the reason when it is not there."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: these tests read real data from ../shared")
    return path


@pytest.fixture
def gpt2_files():
    return shared_path("tokenizers/gpt2/vocab.json"), shared_path("tokenizers/gpt2/merges.txt")


@pytest.fixture
def llama2_model():
    return shared_path("tokenizers/llama2/tokenizer.model")


@pytest.fixture(scope="session")
def run_reference_megatron():
    """Run a Python snippet against the published megatron-core package (an independent reference).

    It lives in its own folder (.ci/run unpacks it there) because it shares the `megatron` package name.
    """
    if not (REFERENCE_MEGATRON / "megatron" / "core").is_dir():
        pytest.skip(f"reference megatron-core not unpacked at {REFERENCE_MEGATRON} (see .ci/run)")

    def run(code: str, cwd=None) -> str:
        env = dict(os.environ, PYTHONPATH=str(REFERENCE_MEGATRON))
        result = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", code],
            cwd=cwd or "/",
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    return run
