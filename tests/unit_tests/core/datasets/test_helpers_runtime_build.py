"""A checkout without the compiled helper: one process compiles it while the others wait, and a failed
compile stops every process with the same message."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import megatron.core.datasets.helpers as installed_helpers

PACKAGE = Path(installed_helpers.__file__).parent
IMPORT_AND_USE = (
    "import numpy; from megatron.core.datasets import helpers; "
    "print(helpers.helpers_cpp.__file__); "
    "print(helpers.build_sample_idx(numpy.array([3, 4], numpy.int32), numpy.array([0, 1], numpy.int32), 2, 1, 7, True, True).tolist())"
)


@pytest.fixture(autouse=True)
def remove_build_state_files(tmp_path):
    """The lock and failure record the helper leaves in the temporary folder for the copied checkout."""
    yield
    name = "megatron-helpers-cpp-" + hashlib.sha1(str(tmp_path / "megatron" / "core" / "datasets").encode()).hexdigest()[:16]
    for suffix in (".lock", ".failed"):
        Path(tempfile.gettempdir(), name + suffix).unlink(missing_ok=True)


def source_checkout_without_the_module(root: Path) -> Path:
    """The megatron.core.datasets sources, helpers.cpp included (and the errors module it imports), but no
    compiled helpers_cpp."""
    package = root / "megatron" / "core" / "datasets"
    package.mkdir(parents=True)
    for init in (root / "megatron", root / "megatron" / "core", package):
        (init / "__init__.py").touch()
    shutil.copy(PACKAGE.parent / "errors.py", package.parent / "errors.py")
    for name in ("helpers.py", "helpers.cpp"):
        shutil.copy(PACKAGE / name, package / name)
    return package


def start_processes(root: Path, count: int, compiler: str):
    env = dict(os.environ, PYTHONPATH=str(root), CXX=compiler)
    return [
        subprocess.Popen([sys.executable, "-c", IMPORT_AND_USE], cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler (c++) on this machine to build the helper")
def test_first_process_compiles_and_the_others_load(tmp_path):
    package = source_checkout_without_the_module(tmp_path)
    log = tmp_path / "compiler.log"
    compiler = tmp_path / "logging-c++"
    compiler.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    processes = start_processes(tmp_path, 2, str(compiler))
    outputs = [process.communicate(timeout=240) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    (built,) = [path for path in package.iterdir() if path.name.startswith("helpers_cpp")]
    for stdout, _ in outputs:
        assert stdout.splitlines() == [str(built), "[[0, 0], [0, 2], [1, 1], [1, 3]]"]
    assert len(log.read_text().splitlines()) == 1  # compiled once, by whichever process took the lock first
    assert not [path for path in package.iterdir() if path.name.endswith(".tmp")]


def test_failed_compile_stops_every_process_with_the_same_message(tmp_path):
    package = source_checkout_without_the_module(tmp_path)
    processes = start_processes(tmp_path, 3, "false")
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [1, 1, 1]
    messages = {stderr.strip() for _, stderr in outputs}
    assert len(messages) == 1, messages
    (message,) = messages
    assert "Traceback" not in message
    assert message.startswith("the C++ dataset helper megatron.core.datasets.helpers_cpp is not built")
    assert "false exited with status 1" in message and "pip install -e ." in message
    assert sorted(path.name for path in package.iterdir()) == ["__init__.py", "helpers.cpp", "helpers.py"]
