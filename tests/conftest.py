import os
import sys
import tempfile
from pathlib import Path

# Tests import their helpers (parity_utils) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from run_utils import TEST_XLA_FLAGS  # noqa: E402

# Before any test starts JAX's backend; the commands the tests start inherit it (run_utils).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# One persistent XLA compilation cache for the whole test session (both xdist workers and the
# subprocesses they start): the same tiny models are compiled by several test files.
_CACHE = os.environ.setdefault(
    "FLUXFLOW_JAX_TEST_CACHE", tempfile.mkdtemp(prefix="fluxflow_jax_test_xla_"))


def pytest_configure(config):
    import jax
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
