"""PyTorch-reference checkpoint import/export (see ``common`` for the engine)."""
from fluxflow_jax.interop.common import InteropError, count_params  # noqa: F401
