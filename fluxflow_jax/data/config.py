"""Dataset config schema: defaults per source type and loud validation.

A dataset config is a Mapping (ml_collections ConfigDict or dict) with a ``type`` and the keys
below. Unknown keys fail with the full key path (``datasets.train.imgsize: unknown key``) because a
misspelt ``flip`` or ``img_size`` would otherwise train for days on the wrong data.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping

from fluxflow_jax.data.secrets import ENV_PREFIX, redact

TYPES = ("folder", "jsonl", "webdataset", "tfds", "shapes", "cache")
MAP_TYPES = ("folder", "jsonl", "tfds", "shapes")   # random-access sources (map_loader.py)

MIN_SIZE = 16
COMMON = {
    "type": None,
    "img_size": 64,             # fixed: output size (int or [h, w]); bucket: target area / cap
    "resize_mode": "bucket",    # 'bucket' | 'fixed'
    "buckets": "auto",          # 'auto' | 'native' | list of [h, w] (bucket mode only)
    "max_aspect": 2.0,          # widest aspect ratio of the 'auto' bucket list
    "crop": "center",           # 'center' | 'random' (fixed mode and list buckets)
    "flip": False,              # random horizontal flip
    "fixed_prompt_prefix": None,
    "max_length": 128,          # token sequence length (the reference's 128)
    "workers": 2,               # decode threads
    "prefetch": 2,              # batches decoded ahead
    "shuffle": True,
    "shuffle_buffer": 256,      # streaming sources only
    "num_samples": None,        # cap (map-style); epoch-size hint (webdataset); size (shapes)
    "scan_cache": None,         # JSON file caching image sizes for bucket assignment
    "min_size": MIN_SIZE,       # images whose shorter side is below this are skipped (too_small)
}
# Why 16: below the smallest bucket side an image is mostly interpolation, and a 1-pixel "image"
# (a tracking pixel, a broken thumbnail) is noise the model would be asked to reconstruct.

PER_TYPE = {
    "folder": {"image_folder": None, "captions_file": None},
    "jsonl": {"image_folder": None, "captions_file": None, "image_key": "image",
              "caption_key": "caption"},
    "webdataset": {"urls": None, "image_key": "jpg;jpeg;png;webp", "caption_key": "txt",
                   "caption_json_key": None,
                   # credentials for http(s) shards, read from the environment at open time
                   "token_env": None, "headers": None},
    "tfds": {"tfds_name": None, "data_dir": None, "split": "train", "image_key": None,
             "caption_key": None},
    "shapes": {"generator_seed": 0, "max_objects": 2},
    "cache": {"path": None, "fingerprint": None},
}
PER_TYPE_DEFAULTS = {"shapes": {"num_samples": 10000}}
REQUIRED = {
    "folder": ("image_folder", "captions_file"),
    "jsonl": ("captions_file",),
    "webdataset": ("urls",),
    "tfds": ("tfds_name",),
    "shapes": (),
    "cache": ("path",),
}
# Keys that do not change which pixels/tokens a sample becomes; left out of content fingerprints.
LOADER_ONLY = ("workers", "prefetch", "shuffle", "shuffle_buffer", "scan_cache", "crop", "flip",
               "token_env", "headers")
# Keys added after datasets were fingerprinted: left out of the fingerprint while at their
# default, so checkpoints and latent caches made before the key existed still match.
LATE_DEFAULTS = {"min_size": MIN_SIZE}
# Where the data lives is not what it is: a dataset copied to another disk still resumes and still
# matches its latent cache (the sources add a hash of their index instead).
PATH_KEYS = ("image_folder", "captions_file", "data_dir", "urls", "path")
# Where a source is: every dataset config may carry all of them, unused ones empty.
LOCATION_KEYS = PATH_KEYS + ("tfds_name",)


def to_plain(cfg: Any) -> Any:
    """ConfigDict / FrozenConfigDict / Mapping / tuple -> plain dicts and lists (recursively)."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    elif hasattr(cfg, "as_configdict"):
        cfg = cfg.as_configdict().to_dict()
    if isinstance(cfg, Mapping):
        return {str(k): to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_plain(v) for v in cfg]
    return cfg


def dataset_name(name: str) -> str:
    """``'datasets.train'`` or ``'train'`` -> ``'train'`` (messages add the prefix themselves)."""
    return name[len("datasets."):] if name.startswith("datasets.") else name


def _err(name: str, key: str, msg: str) -> ValueError:
    return ValueError(f"datasets.{name}.{key}: {msg}")


def _size_pair(name: str, key: str, v: Any) -> tuple[int, int]:
    if isinstance(v, bool):
        raise _err(name, key, f"expected an int or [h, w], got {v!r}")
    if isinstance(v, int):
        pair = (v, v)
    elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        pair = (int(v[0]), int(v[1]))
    else:
        raise _err(name, key, f"expected an int or [h, w], got {v!r}")
    if min(pair) < 16 or pair[0] % 16 or pair[1] % 16:
        raise _err(name, key, f"sizes must be multiples of 16 and >= 16, got {v!r}")
    return pair


def resolve(ds_cfg: Mapping, name: str = "train") -> dict:
    """Validated dataset config with every default filled in.

    Raises ValueError naming ``datasets.<name>.<key>`` for unknown keys, missing required keys and
    out-of-range values.
    """
    name = dataset_name(name)
    raw = to_plain(ds_cfg)
    if not isinstance(raw, dict):
        raise ValueError(f"datasets.{name}: expected a mapping, got {type(ds_cfg).__name__}")
    typ = raw.get("type")
    if typ not in TYPES:
        raise _err(name, "type", f"must be one of {TYPES}, got {typ!r}")
    allowed = {**COMMON, **PER_TYPE[typ], **PER_TYPE_DEFAULTS.get(typ, {})}
    # Configs carry every location key ('' = unset) so a dataset can be re-pointed at another
    # type of source from the command line (a locked config cannot gain keys there).
    raw = {k: v for k, v in raw.items()
           if not (k in LOCATION_KEYS and k not in allowed and v in ("", None))}
    for key in raw:
        if key not in allowed:
            other = [t for t in TYPES if key in PER_TYPE[t]]
            hint = f" (it belongs to type {other[0]!r})" if other else ""
            raise _err(name, key, f"unknown key for type {typ!r}{hint}")
    cfg = {**allowed, **{k: v for k, v in raw.items()}}
    for key in REQUIRED[typ]:
        if cfg.get(key) in (None, "", []):
            raise _err(name, key, f"required for type {typ!r}")

    if cfg["resize_mode"] not in ("bucket", "fixed"):
        raise _err(name, "resize_mode", f"must be 'bucket' or 'fixed', got {cfg['resize_mode']!r}")
    cfg["img_size"] = list(_size_pair(name, "img_size", cfg["img_size"]))
    b = cfg["buckets"]
    if isinstance(b, str):
        if b not in ("auto", "native"):
            raise _err(name, "buckets", f"must be 'auto', 'native' or a list of [h, w], got {b!r}")
    elif isinstance(b, (list, tuple)) and b:
        cfg["buckets"] = sorted({_size_pair(name, "buckets", x) for x in b})
        cfg["buckets"] = [list(x) for x in cfg["buckets"]]
    else:
        raise _err(name, "buckets", f"must be 'auto', 'native' or a non-empty list, got {b!r}")
    if not (isinstance(cfg["max_aspect"], (int, float)) and cfg["max_aspect"] >= 1.0):
        raise _err(name, "max_aspect", f"must be a number >= 1, got {cfg['max_aspect']!r}")
    if cfg["crop"] not in ("center", "random"):
        raise _err(name, "crop", f"must be 'center' or 'random', got {cfg['crop']!r}")
    for key in ("flip", "shuffle"):
        if not isinstance(cfg[key], bool):
            raise _err(name, key, f"must be a bool, got {cfg[key]!r}")
    for key, lo in (("max_length", 2), ("workers", 0), ("prefetch", 1), ("shuffle_buffer", 0),
                    ("min_size", 1)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _err(name, key, f"must be an int >= {lo}, got {v!r}")
    n = cfg["num_samples"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise _err(name, "num_samples", f"must be a positive int or None, got {n!r}")
    p = cfg["fixed_prompt_prefix"]
    if p is not None and not isinstance(p, str):
        raise _err(name, "fixed_prompt_prefix", f"must be a string or None, got {p!r}")
    if typ == "webdataset":
        urls = cfg["urls"]
        if isinstance(urls, str):
            cfg["urls"] = [urls]
        elif not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
            raise _err(name, "urls", f"must be a string or a list of strings, got "
                                     f"{redact(urls)!r}")
        _check_credentials(cfg, name)
    mo = cfg.get("max_objects")
    if typ == "shapes" and not (isinstance(mo, int) and 1 <= mo <= 2):
        raise _err(name, "max_objects", f"must be 1 or 2, got {cfg['max_objects']!r}")
    return cfg


def _check_credentials(cfg: dict, name: str) -> None:
    """``token_env`` / ``headers`` are sent with http(s) shards only: a ``pipe:`` command gets the
    environment anyway (write ``$HF_TOKEN`` in it), and a key that reaches no request would be
    a silent no-op."""
    te, hd = cfg["token_env"], cfg["headers"]
    if te is not None and not (isinstance(te, str) and te.isidentifier()):
        raise _err(name, "token_env", f"must be an environment variable name like 'HF_TOKEN', "
                                      f"got {redact(te)!r}")
    if hd is not None:
        if not (isinstance(hd, dict) and all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in hd.items())):
            raise _err(name, "headers", "must be a mapping of header name -> string (a value "
                                        "'env:NAME' is read from the environment)")
        for k, v in hd.items():
            if v.startswith(ENV_PREFIX) and not v[len(ENV_PREFIX):].isidentifier():
                raise _err(name, f"headers.{k}", f"{v!r} does not name an environment variable")
    if (te or hd) and not any(u.startswith(("http://", "https://")) for u in cfg["urls"]):
        key = "token_env" if te else "headers"
        raise _err(name, key, "is sent with http(s) urls only and no url is one; in a pipe: "
                              "command write the variable instead (e.g. \"$HF_TOKEN\")")


def validate_dataset_config(ds_cfg: Mapping, name: str = "train") -> list[str]:
    """The config errors of one dataset as messages (empty when valid), for validators that
    collect every error of a config before failing."""
    try:
        resolve(ds_cfg, name)
    except ValueError as e:
        return [str(e)]
    return []


def validate_datasets(datasets: Mapping) -> dict:
    """Resolve every named dataset up front, so a typo in the last stage fails at start-up."""
    plain = to_plain(datasets)
    if not isinstance(plain, dict) or not plain:
        raise ValueError("datasets: expected a non-empty mapping of name -> dataset config")
    return {name: resolve(cfg, name) for name, cfg in plain.items()}


def select_dataset(datasets: Mapping, name: str | None, default: str | None = None) -> dict:
    """The config of the dataset a stage names (or ``default``), resolved; an unknown name fails
    listing the known ones (the reference fell back to top-level args, section 10 item 22)."""
    plain = to_plain(datasets)
    key = name or default
    if not key or key not in plain:
        raise ValueError(f"stage dataset {key!r} is not in datasets (have: {sorted(plain)})")
    return resolve(plain[key], key)


def content_fingerprint(cfg: Mapping, extra: Any = None) -> str:
    """Stable hash of what a sample becomes (source, sizes, prompt prefix, tokens), not how it is
    loaded; used to refuse resuming or reusing a latent cache against a changed dataset."""
    body = {k: v for k, v in sorted(cfg.items()) if k not in LOADER_ONLY + PATH_KEYS
            and not (k in LATE_DEFAULTS and v == LATE_DEFAULTS[k])}
    blob = json.dumps({"cfg": body, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_batch(global_batch_size: int, process_count: int, name: str) -> int:
    """Host-local batch size; the global batch must divide evenly across hosts."""
    if global_batch_size < 1:
        raise ValueError(f"datasets.{name}: global batch size must be >= 1, "
                         f"got {global_batch_size}")
    if global_batch_size % process_count:
        raise ValueError(
            f"datasets.{name}: global batch size {global_batch_size} is not divisible by the "
            f"process count {process_count}")
    return global_batch_size // process_count


def is_fixed_size(cfg: Mapping) -> bool:
    """True when every batch has the shape ``img_size`` (fixed mode or a single bucket)."""
    if cfg["resize_mode"] == "fixed":
        return True
    return isinstance(cfg["buckets"], list) and len(cfg["buckets"]) == 1


def ceil16(x: float) -> int:
    return int(math.ceil(x / 16.0)) * 16
