"""Python face of the compiled index builders in helpers.cpp.

`pip install -e .` compiles them. A source checkout that was never installed has no compiled module: then
the first process of a node to take a file lock compiles it while the others wait on that lock and load
the result. If the build fails, every process stops with the same message, so no rank is left waiting at a
barrier for a peer that died.
"""

import fcntl
import hashlib
import importlib
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy
from megatron.core.errors import UserError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MODULE = "megatron.core.datasets.helpers_cpp"
_SOURCE = os.path.join(_PACKAGE_DIR, "helpers.cpp")
# The lock and the failure record live in the node-local temporary folder, one pair per checkout.
_BUILD_STATE = os.path.join(
    tempfile.gettempdir(), "megatron-helpers-cpp-" + hashlib.sha1(_PACKAGE_DIR.encode()).hexdigest()[:16]
)
_LOCK = _BUILD_STATE + ".lock"
_FAILURE_RECORD = _BUILD_STATE + ".failed"


class HelpersBuildError(UserError, RuntimeError):
    """The compiled helper is missing and could not be built here."""


def _failure_message(reason: str) -> str:
    return (
        f"the C++ dataset helper {_MODULE} is not built and building it from {_SOURCE} failed: {reason}. "
        "Install the project with `pip install -e .` (needs a C++17 compiler and pybind11), then run again"
    )


def _compile() -> None:
    """Compile helpers.cpp next to itself, under a temporary name renamed into place when complete."""
    try:
        import pybind11
    except ImportError:
        raise HelpersBuildError("pybind11 is not installed") from None
    target = os.path.join(_PACKAGE_DIR, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    temporary = f"{target}.{socket.gethostname()}.{os.getpid()}.tmp"
    command = [
        os.environ.get("CXX", "c++"),
        "-O3",
        "-shared",
        "-std=c++17",
        "-fPIC",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        _SOURCE,
        "-o",
        temporary,
    ]
    if sys.platform == "darwin":
        command[1:1] = ["-undefined", "dynamic_lookup"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise HelpersBuildError(f"cannot run the compiler {command[0]!r} ({error.strerror})") from None
    if result.returncode != 0:
        if os.path.exists(temporary):
            os.remove(temporary)
        last_lines = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise HelpersBuildError(f"{command[0]} exited with status {result.returncode}: {last_lines}")
    os.replace(temporary, target)


def _record_failure(message: str) -> None:
    temporary = f"{_FAILURE_RECORD}.{os.getpid()}.tmp"
    with open(temporary, "w") as record:
        record.write(message)
    os.replace(temporary, _FAILURE_RECORD)


def _failure_recorded_since(moment: float):
    """The message of a build that failed while this process waited for the lock (an older one is stale)."""
    try:
        if os.path.getmtime(_FAILURE_RECORD) >= moment:
            with open(_FAILURE_RECORD) as record:
                return record.read()
    except OSError:
        pass
    return None


def _build_once_per_node():
    """Import the compiled module, compiling it first if needed: one process builds, the others wait."""
    waiting_since = time.time()
    try:
        lock = open(_LOCK, "a")
    except OSError as error:
        raise SystemExit(_failure_message(f"cannot create the lock {_LOCK} ({error.strerror})")) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        importlib.invalidate_caches()
        try:
            return importlib.import_module(_MODULE)  # built by the process that held the lock before us
        except ImportError:
            pass
        message = _failure_recorded_since(waiting_since)
        if message is None:
            try:
                _compile()
                importlib.invalidate_caches()
                return importlib.import_module(_MODULE)
            except (HelpersBuildError, ImportError) as error:
                message = _failure_message(str(error))
                _record_failure(message)
    raise SystemExit(message)


try:
    helpers_cpp = importlib.import_module(_MODULE)
except ImportError:
    helpers_cpp = _build_once_per_node()

build_blending_indices = helpers_cpp.build_blending_indices
build_exhaustive_blending_indices = helpers_cpp.build_exhaustive_blending_indices


def build_sample_idx(
    sizes: numpy.ndarray,
    document_indices: numpy.ndarray,
    sequence_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> numpy.ndarray:
    """Return the [num_samples + 1, 2] sample index (document position, offset) of a GPT dataset.

    int32 when every value fits, int64 otherwise, so billions of tokens never overflow.
    """
    sizes = numpy.ascontiguousarray(sizes, dtype=numpy.int32)
    document_indices = numpy.ascontiguousarray(document_indices, dtype=numpy.int32)
    largest_value = max(document_indices.shape[0], int(sizes.max()) if sizes.size else 0)
    builder = (
        helpers_cpp.build_sample_idx_int32
        if largest_value <= numpy.iinfo(numpy.int32).max
        else helpers_cpp.build_sample_idx_int64
    )
    return builder(
        sizes,
        document_indices,
        sequence_length,
        num_epochs,
        tokens_per_epoch,
        drop_last_partial_sequence,
        1 if add_extra_token_to_sequence else 0,
    )
