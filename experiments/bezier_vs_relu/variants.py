"""Configs of the Bezier-vs-ReLU/SiLU experiment and the two ways of matching the variants.

A variant is ``(activation, head activation, vae_dim)``. Two matchings are run because they differ:

* equal width (``relu``, ``silu``): the same ``vae_dim`` as Bezier. A Bezier site's feeding layer
  is 5x wide (``bezier.act_width``), the ablation's 1x, so these models have fewer parameters.
* equal parameters (``relu_params``, ``silu_params``): ``vae_dim`` widened to the value whose
  parameter count is nearest Bezier's (found by counting, not by formula, so every layer counts).

Heads: the reference puts a trainable Bezier on the VAE's output sites (latent mean and
log-variance, RGB). ``model.activation`` alone turns those into the ablation's activation too, so
``relu``/``silu`` clamp the RGB output to [0, inf) / [-0.28, inf) while the images span [-1, 1].
The ``*_lin`` variants set ``model.vae_head_activation='identity'``: linear heads, as a standard
ReLU/SiLU VAE has them (no parameters there either, so the counts equal the plain ablation's).

Everything else - data, seed, steps, optimizer, loss, evaluation - is the same config; only
``model.activation``, ``model.vae_head_activation`` and ``model.vae_dim`` differ. Parameter counts come from ``jax.eval_shape``
of the registry's own initialiser (no compute).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import ml_collections as mlc

from configs import phase1
from fluxflow_jax import config_defaults as cd
from fluxflow_jax.models import registry

STAGE = "vae"
VARIANTS = ("bezier", "relu", "silu", "relu_params", "silu_params",
            "relu_lin", "silu_lin", "relu_lin_params", "silu_lin_params")

# Model/data/run lengths per size. 'cpu': the experiment's real size (32 px shapes, 8x8 latent grid
# - downscales 3 never leaves the flat-background plateau at this size, experiments/shapes_t2i).
# 'tiny': the test's size. 'phase1': the reference's Phase 1 model (printed, not run on 2 cores).
SIZES = {
    "tiny": {"vae_dim": 8, "downscales": 2, "img": 16, "batch": 4, "steps": 6, "eval_every": 3,
             "eval_num": 4, "samples": 64, "attn_layers": 1, "attn_heads": 2},
    "cpu": {"vae_dim": 16, "downscales": 2, "img": 32, "batch": 8, "steps": 600,
            "eval_every": 50, "eval_num": 64, "samples": 4096, "attn_layers": 1, "attn_heads": 2},
    "phase1": {"vae_dim": 128, "downscales": 4, "img": 256, "batch": 2, "steps": 20000,
               "eval_every": 1000, "eval_num": 64, "samples": 20000, "attn_layers": 4,
               "attn_heads": 8},
}


def activation_of(variant: str) -> str:
    """``'relu_params'`` -> ``'relu'``: the model.activation a variant trains."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return variant.split("_")[0]


def head_of(variant: str) -> str:
    """The model.vae_head_activation of a variant: 'identity' for ``*_lin``, else ''."""
    return "identity" if "_lin" in variant else ""


def is_matched(variant: str) -> bool:
    """Whether the variant's width is chosen for Bezier's parameter count."""
    return variant.endswith("_params")


def stage_config(size: str, steps: int) -> mlc.ConfigDict:
    """The VAE reconstruction stage: Phase 1's models (VAE + SPADE, no GAN, no LPIPS), gradient
    clip 1.0, KL beta 1e-4 and cosine schedule. At the CPU sizes the optimizer is Adam 1e-3 with a
    deterministic encoder and MSE 1.0 (the demo's recipe): Phase 1's RMSprop 1e-5 with a 5000-step
    KL warm-up is tuned for ~50k COCO steps and does not leave the flat-background plateau within a
    CPU budget, which would make every variant tie at the baseline and answer nothing."""
    if size == "phase1":
        s = mlc.ConfigDict(phase1.get_config("").stages.phase1_vae.to_dict())
        s.name, s.epochs, s.steps = STAGE, 0, steps
        return s
    adam = cd.optimizer("AdamW", 1e-3, betas=(0.9, 0.99), weight_decay=0.0, clip_norm=1.0)
    cosine = cd.scheduler("CosineAnnealingLR", eta_min_factor=0.3,
                          warmup_steps=min(20, max(1, steps // 10)))
    loss = {"sample_posterior": False, "adaptive_weights": False, "mse_weight": 1.0,
            "color_stats_weight": 0.0, "hist_weight": 0.0, "contrast_weight": 0.0,
            "kl_beta": 1e-4, "kl_warmup_steps": min(100, steps)}
    return cd.stage(STAGE, train=("vae", "spade"), steps=steps, optimizers={"vae": adam},
                    schedulers={"vae": cosine}, loss=loss)


def make_config(size: str, activation: str, vae_dim: int, seed: int,
                steps: int | None = None, head: str = "") -> mlc.ConfigDict:
    """One run's pipeline config: a single VAE stage on procedural shapes, held-out eval on."""
    z = SIZES[size]
    steps = int(steps or z["steps"])
    c = cd.base_config()
    c.model = cd.model_config("phase1" if size == "phase1" else "tiny")
    c.model.activation = activation
    c.model.vae_head_activation = head
    c.model.vae_dim = int(vae_dim)
    c.model.downscales = c.model.upscales = z["downscales"]
    c.model.vae_attn_layers, c.model.vae_attn_heads = z["attn_layers"], z["attn_heads"]
    c.seed = int(seed)
    c.rng_impl = "rbg"  # compiles several times faster on XLA:CPU (configs/demo.py)
    c.max_length = 16
    c.datasets.shapes = cd.dataset_config("shapes", num_samples=z["samples"], img_size=z["img"])
    c.default_dataset = "shapes"
    c.batch_size = z["batch"]
    c.stages[STAGE] = stage_config(size, steps)
    c.stage_order = (STAGE,)
    c.log_interval = 1  # every step's loss and wall time: spikes and step time per step
    c.checkpoint.interval_steps = 10 ** 9  # only the end-of-stage checkpoint
    c.checkpoint.interval_minutes = 0.0
    c.samples.enabled = False
    c.plots = False
    c.tensorboard = False
    c.eval.interval_steps = min(int(z["eval_every"]), steps)
    c.eval.num_images = int(z["eval_num"])
    return c


def vae_param_count(size: str, activation: str, vae_dim: int, head: str = "") -> int:
    """Parameters of compressor + expander (SPADE included), counted on abstract shapes."""
    c = make_config(size, activation, vae_dim, 0, steps=1, head=head)
    models = registry.build_models(c.model, {"compressor", "expander"})
    shapes = jax.eval_shape(lambda k: registry.init_params(models, k, image_hw=(32, 32))[0],
                            jax.random.key(0, impl="rbg"))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def matched_width(size: str, activation: str, target: int, step: int = 2,
                  head: str = "") -> tuple[int, int]:
    """``(vae_dim, params)`` of the ``activation`` model whose count is nearest ``target``.

    Widths move in steps of ``step`` (the attention head count must divide vae_dim); widths the
    model refuses (group norms of min(32, C) groups need C divisible by it above 32) are skipped.
    The count grows monotonically with the width, so the search stops once it passes the target."""
    base = SIZES[size]["vae_dim"]
    best = (base, vae_param_count(size, activation, base, head))
    d = base
    while best[1] < target and d < 64 * base:
        d += step
        try:
            n = vae_param_count(size, activation, d, head)
        except ValueError:  # an invalid width for this architecture
            continue
        if abs(n - target) < abs(best[1] - target):
            best = (d, n)
        if n >= target:
            break
    return best


def plan(size: str, variants: list[str]) -> dict[str, dict]:
    """``{variant: {activation, head, vae_dim, params, matching}}`` for the requested variants.
    Widths and counts are computed once per (activation, head, matching) and shared."""
    base = SIZES[size]["vae_dim"]
    step = SIZES[size]["attn_heads"]
    bezier_params = vae_param_count(size, "bezier", base)
    memo: dict[tuple, tuple[int, int]] = {}
    out: dict[str, dict] = {}
    for v in variants:
        act, head = activation_of(v), head_of(v)
        key = (act, head, is_matched(v))
        if key not in memo:
            memo[key] = (matched_width(size, act, bezier_params, step, head) if is_matched(v)
                         else (base, bezier_params if act == "bezier"
                               else vae_param_count(size, act, base, head)))
        d, n = memo[key]
        how = ("equal parameters" if is_matched(v) else
               "reference" if act == "bezier" else "equal width")
        out[v] = {"activation": act, "head": head or act, "vae_dim": d, "params": n,
                  "matching": how, "bezier_params": bezier_params}
    return out


def describe(p: Mapping[str, dict]) -> str:
    """One line per variant, for the console and the README."""
    return "\n".join(f"  {v:<16} activation={q['activation']:<6} heads={q['head']:<8} "
                     f"vae_dim={q['vae_dim']:<4} "
                     f"params={q['params']:>9,} ({q['matching']})" for v, q in p.items())
