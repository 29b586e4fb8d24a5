"""Building blocks for ``configs/*.py``: the defaults of a run, a model, a dataset and a stage.

Config files compose these (``get_config(arg)``); all checking happens in
``fluxflow_jax.stages.validate_config`` so every mistake is reported at once, each with its key.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional, Sequence

import ml_collections as mlc

from fluxflow_jax import losses
from fluxflow_jax.data.config import LOCATION_KEYS
from fluxflow_jax.lora import LORA_DEFAULTS


def model_config(size: str = "phase1") -> mlc.ConfigDict:
    """Model sizes. ``phase1`` is the reference's training size (REFERENCE.md 1.9)."""
    if size == "phase1":
        m = dict(vae_dim=128, downscales=4, upscales=4, vae_attn_layers=4, vae_attn_heads=8,
                 flow_dim=128, flow_layers=10, flow_heads=8, text_embedding_dim=1024,
                 disc=dict(base_ch=64, depth=4),
                 text=dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                           max_position_embeddings=512, dropout=0.1, pooling="mean",
                           freeze_backbone=False, pretrained_dir=""))
    elif size == "tiny":  # CPU size: seconds per step on 2 cores
        m = dict(vae_dim=16, downscales=4, upscales=4, vae_attn_layers=1, vae_attn_heads=2,
                 flow_dim=32, flow_layers=2, flow_heads=2, text_embedding_dim=32,
                 disc=dict(base_ch=8, depth=2),
                 text=dict(vocab_size=0, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64, dropout=0.0, pooling="masked_mean",
                           freeze_backbone=False, pretrained_dir=""))
    else:
        raise ValueError(f"model size must be 'phase1' or 'tiny', got {size!r}")
    # vae_head_activation: the VAE's mu/logvar/RGB sites in an ablation ('' = activation,
    # 'identity' = linear heads; models/bezier.py head_site).
    m.update(max_hw=1024, activation="bezier", vae_head_activation="", remat=False,
             dtype="float32")
    return mlc.ConfigDict(m)


def dataset_config(type: str, **kw: Any) -> mlc.ConfigDict:
    """A dataset entry (keys are checked by ``fluxflow_jax.data``). Every location key is present
    ('' when unused) so the command line can re-point it, e.g. ``--config.datasets.shapes.type=
    folder --config.datasets.shapes.image_folder=/data/img --config.datasets.shapes.captions_file=
    /data/captions.txt``."""
    locations = dict.fromkeys(LOCATION_KEYS, "")
    return mlc.ConfigDict(dict(locations, type=type, **kw))


def optimizer(type: str, lr: float, **kw: Any) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(type=type, lr=lr, **kw))


def scheduler(type: str, **kw: Any) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(type=type, **kw))


def loss_config(**overrides: Any) -> mlc.ConfigDict:
    """A stage's ``loss`` block: every key of ``losses.LOSS_SCHEMA`` with its default."""
    d = losses.loss_defaults()
    unknown = sorted(set(overrides) - set(d))
    if unknown:
        raise KeyError(f"loss config: unknown key(s) {unknown}; known: {sorted(d)}")
    d.update(overrides)
    return mlc.ConfigDict(d)


# Samplers a stage or the generate command can choose (sampling.py implements each).
SAMPLERS = ("euler", "heun", "vpred")

STAGE_DEFAULTS = dict(
    name="", description="", epochs=0, steps=0, train=(), freeze=(), dataset="",
    batch_size=0, grad_accum=1, ema_decay=0.0, ema_warmup=False, latent_cache=False,
    stop_metric="", stop_threshold=0.0, stop_window=20, stop_mode="below",
    sample_prompts=(), sample_steps=20, guidance_scale=3.0, num_sample_images=4,
    sampler="",  # euler | heun | vpred; "" = the one matching loss.objective
)


def stage(name: str, *, train: Sequence[str], optimizers: Optional[dict] = None,
          schedulers: Optional[dict] = None, loss: Optional[dict] = None,
          **kw: Any) -> mlc.ConfigDict:
    """One pipeline stage. Unknown keyword keys are kept so the validator can name them."""
    d = dict(STAGE_DEFAULTS)
    d.update(name=name, train=tuple(train), **kw)
    d["optimizers"] = mlc.ConfigDict({k: mlc.ConfigDict(v) for k, v in (optimizers or {}).items()})
    d["schedulers"] = mlc.ConfigDict({k: mlc.ConfigDict(v) for k, v in (schedulers or {}).items()})
    d["loss"] = loss_config(**(loss or {}))
    return mlc.ConfigDict(d)


def lora_config(**overrides: Any) -> mlc.ConfigDict:
    """A stage's ``lora`` block: every key of ``lora.LORA_DEFAULTS`` (rank, alpha, target_layers,
    trigger, DOP ...) with its default, then ``overrides``."""
    unknown = sorted(set(overrides) - set(LORA_DEFAULTS))
    if unknown:
        raise KeyError(f"lora config: unknown key(s) {unknown}; known: {sorted(LORA_DEFAULTS)}")
    return mlc.ConfigDict({**LORA_DEFAULTS, **overrides})


def base_config() -> mlc.ConfigDict:
    """Run-level defaults shared by every config."""
    c = mlc.ConfigDict()
    c.seed = 0
    # PRNG implementation: 'threefry2x32' gives the same numbers on every platform; 'rbg' compiles
    # several times faster on XLA:CPU (init and dropout/noise draws) - the demo uses it.
    c.rng_impl = "threefry2x32"
    c.model = model_config("phase1")
    c.tokenizer = "demo"  # a local tokenizer directory, or 'demo' for the embedded one
    c.max_length = 128
    c.datasets = mlc.ConfigDict()
    c.default_dataset = ""
    c.batch_size = 2  # global batch (all hosts and devices)
    c.mesh = (("data", -1),)
    c.sharding_rules = ()  # ((regex, spec), ...) on '/'-joined param paths; default replicate
    c.stages = mlc.ConfigDict()
    c.stage_order = ()
    c.init_from = ""  # reference checkpoint (file/dir) or fluxflow_jax param file
    c.log_interval = 10
    # Divergence policy: a non-finite update is skipped (and reported); this many in a row stop the
    # stage with exit code 3, keeping the last good checkpoint.
    c.max_nonfinite_in_a_row = 5
    # Background threads compiling the steps for the batch shapes (aspect buckets) a stage will
    # meet, once its first shape has compiled: -1 = one per 4 CPU cores (1-8), 0 = off (each shape
    # then compiles when first met); see compile_ahead.py
    c.compile_ahead = -1
    c.checkpoint = mlc.ConfigDict(dict(interval_steps=500, interval_minutes=30.0, max_to_keep=3,
                                       async_save=True))
    # spade: decode samples/generations with SPADE context - 'auto' = when a stage of this run
    # trained it; 'on'/'off' for an init_from expander this run did not train (e.g. LoRA runs)
    c.samples = mlc.ConfigDict(dict(enabled=True, num_images=4, seed=1234, spade="auto"))
    # Held-out metrics every interval_steps (0 = off) into the JSONL, TensorBoard and plots:
    # PSNR/SSIM beside the mean-image and background baselines, shapes colour/relation scores.
    c.eval = mlc.ConfigDict(dict(interval_steps=0, num_images=16, lpips_weights=""))
    # W/graph/<stage>_*.png, redrawn at a checkpoint a minute or more after the last drawing,
    # and always at a stage's end, a divergence and a forced save (train.PLOT_EVERY_S)
    c.plots = True
    c.tensorboard = True
    return c


def load_config_file(spec: str, root: str | Path | None = None) -> Any:
    """``get_config(arg)`` of a config file given as ``--config`` takes it, ``path.py[:arg]``
    (``path`` under ``root`` when given), for the tools that read one outside the entry point."""
    path, _, arg = spec.partition(":")
    file = Path(root, path) if root is not None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config: {path!r} is not a file (expected e.g. "
                                "configs/phase1.py or configs/phase1.py:runlocal)")
    mod_spec = importlib.util.spec_from_file_location(f"_fluxflow_cfg_{file.stem}", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise KeyError(f"--config {path}: the file defines no get_config(arg)")
    return module.get_config(arg) if arg else module.get_config()
