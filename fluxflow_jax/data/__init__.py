"""Data input: sources, transforms, deterministic resumable loaders, demo data, latent caches.

Entry points:
  make_loader(ds_cfg, global_batch_size=, seed=, tokenizer=, ...) -> loader (see loader.py)
  load_tokenizer(path | None | 'demo'), tokenize(tokenizer, captions, max_length)
  validate_datasets(config.datasets) - fail at start-up on any dataset's config typo
  shapes.scene / shapes.sample - the procedural demo generator with ground truth
  build_latent_cache / open_latent_cache / find_latent_cache - precomputed encoder outputs
  redact(text | config) - credentials masked, for anything printed or saved;
  redacted_json(config) - the run's config.json text, credentials masked
  python -m fluxflow_jax.data.tfds_pack - pack a folder into a TFDS ArrayRecord dataset
"""
from fluxflow_jax.data import shapes
from fluxflow_jax.data.cache import (build_latent_cache, cache_fingerprint, find_latent_cache,
                                     open_latent_cache, params_fingerprint)
from fluxflow_jax.data.config import resolve as resolve_dataset_config
from fluxflow_jax.data.config import (select_dataset, validate_dataset_config,
                                      validate_datasets)
from fluxflow_jax.data.demo import demo_photos_config, demo_shapes_config, write_shapes_folder
from fluxflow_jax.data.errors import REASONS, BadSample, DataError
from fluxflow_jax.data.loader import make_loader
from fluxflow_jax.data.secrets import redact, redacted_json
from fluxflow_jax.data.tokenizer import (DEMO_TOKENIZER_DIR, load_tokenizer, tokenize,
                                         write_wordpiece_tokenizer)
from fluxflow_jax.data.transforms import to_float, to_uint8

__all__ = [
    "BadSample", "DataError", "DEMO_TOKENIZER_DIR", "REASONS", "build_latent_cache",
    "cache_fingerprint", "demo_photos_config", "demo_shapes_config", "find_latent_cache",
    "load_tokenizer", "make_loader", "open_latent_cache", "params_fingerprint",
    "resolve_dataset_config", "select_dataset", "shapes", "to_float", "to_uint8", "tokenize",
    "validate_dataset_config", "validate_datasets", "write_shapes_folder",
    "write_wordpiece_tokenizer",
]
