"""Multi-rank data-parallel tests reuse the tensor-parallel folder's gloo launcher."""

from tests.unit_tests.core.tensor_parallel.conftest import run_on_gloo  # noqa: F401 (pytest fixture)
