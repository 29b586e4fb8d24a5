import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Tests import their helpers (parity_utils) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from run_utils import TEST_XLA_FLAGS  # noqa: E402

# Before any test starts JAX's backend; the commands the tests start inherit it (run_utils).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# The commands the tests start store every program in the session's compilation cache, not only
# those that compile in over xla.CACHE_MIN_COMPILE_S: most of their compilations are eval,
# sampling and small helper programs that the next command compiles again (tests/test_lora_e2e.py,
# 8 commands: 111.8 -> 104.2 s wall). The pytest processes keep JAX's 1 s (pytest_configure).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# One persistent XLA compilation cache for the whole test session (both xdist workers and the
# subprocesses they start): the same tiny models are compiled by several test files. xdist's
# controller hands its folder to the workers (they do not inherit its environment); the process
# that made the folder removes it at the end (a full run leaves about 130 MB of executables).
_CACHE_ENV = "FLUXFLOW_JAX_TEST_CACHE"
_cache = {"path": os.environ.get(_CACHE_ENV), "own": False}


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # xdist's controller, once per worker
    node.workerinput[_CACHE_ENV] = _cache["path"]


def pytest_configure(config):
    import jax
    worker = getattr(config, "workerinput", None)
    if worker is not None and worker.get(_CACHE_ENV):
        _cache["path"] = worker[_CACHE_ENV]
    elif not _cache["path"]:
        _cache.update(path=tempfile.mkdtemp(prefix="fluxflow_jax_test_xla_"), own=True)
    os.environ[_CACHE_ENV] = _cache["path"]  # the commands the tests start use it too
    jax.config.update("jax_compilation_cache_dir", _cache["path"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_unconfigure(config):
    if _cache["own"]:
        shutil.rmtree(_cache["path"], ignore_errors=True)
