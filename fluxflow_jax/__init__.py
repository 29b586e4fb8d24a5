"""fluxflow_jax: FluxFlow text-to-image models trained with JAX/Flax."""

__version__ = "0.1.0"
