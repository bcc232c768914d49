"""scripts/fast_allocator.sh, which the training scripts source: it preloads the allocator it is told to, once,
keeps glibc's when told so or when none is installed, and stops a script at a path that does not exist."""

import os
import subprocess

from tests.conftest import REPO_ROOT


def _source(malloc, preload="", twice=False):
    """LD_PRELOAD after sourcing the helper under `set -euo pipefail` (once or twice), and the result."""
    command = "set -euo pipefail; . scripts/fast_allocator.sh" + ("; . scripts/fast_allocator.sh" if twice else "")
    env = dict(os.environ, MEGATRON_MALLOC=malloc, LD_PRELOAD=preload)
    result = subprocess.run(
        ["bash", "-c", command + '; echo "LD_PRELOAD=$LD_PRELOAD"'], cwd=REPO_ROOT, env=env, capture_output=True,
        text=True,
    )
    return result


def test_a_named_library_is_preloaded_once_ahead_of_the_others(tmp_path):
    library = tmp_path / "libfake_malloc.so"
    library.write_bytes(b"")  # only named, never loaded: the helper runs bash builtins after the export
    result = _source(str(library), preload="/other.so", twice=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"LD_PRELOAD={library}:/other.so"


def test_none_keeps_glibc():
    result = _source("none", preload="/other.so")
    assert result.returncode == 0 and result.stdout == "LD_PRELOAD=/other.so\n"


def test_auto_preloads_only_an_installed_library():
    result = _source("auto")
    preload = result.stdout.splitlines()[-1].removeprefix("LD_PRELOAD=")
    assert result.returncode == 0
    assert preload == "" or (os.path.isfile(preload) and ("jemalloc" in preload or "tcmalloc" in preload))


def test_a_missing_library_stops_the_script_with_one_line():
    result = _source("/no/such/libjemalloc.so")
    assert result.returncode != 0 and "LD_PRELOAD=" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        "MEGATRON_MALLOC=/no/such/libjemalloc.so: no such file; set it to an allocator's .so, auto or none"
    ]
