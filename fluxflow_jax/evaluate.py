"""Evaluation: image metrics, baselines, shapes conditioning scores; a CLI and a library.

  python -m fluxflow_jax.evaluate --workdir W [--stage S] [--weights auto|ema|raw] [--num N] \\
      [--steps N] [--guidance G] [--sampler S] [--lpips_weights F[,F]] [--json PATH]

prints a table and writes JSON (default ``W/eval/<stage>.json``). On the procedural shapes data
the held-out set is the same generator under another seed (``generator_seed + HELDOUT_SEED``), so
no training image is ever evaluated; on other datasets it is a fixed batch of the configured data
(the JSON says ``held_out: false``).

* Reconstructions (compressor + expander, posterior mean, SPADE on): PSNR and SSIM (dm-pix, on
  the images mapped to [0, 1], the usual convention), LPIPS when weights are configured.
  A PSNR is reported beside two baselines a useless model already reaches: the **mean image** of
  the set for every image, and on shapes data the **background only** (each scene rendered
  without its objects) - grey backgrounds dominate these images, so 16-20 dB means nothing.
* Conditioning (flow + text encoder, shapes data): images generated from the held-out captions,
  scored from pixels against the ground truth. ``color_score``: fraction of prompted objects whose
  colour covers at least ``min_pixels`` pixels; ``relation_score``: fraction of two-object
  prompts whose two colours' centroids stand in the prompted relation. The same scores of the
  real held-out images are reported as ``*_data`` (what a perfect model reaches).
  ``recon_color_score``: the colour score of the reconstructions of the single-object scenes
  (does the VAE keep each object's colour).

``Evaluator(models, ...)(params) -> {'eval/psnr': ..., ...}`` is what a training loop calls every
``eval_interval`` steps; ``make_evaluator(config, models, tokenizer, stage_cfg)`` builds it from
a run config.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax import interop, loading, sampling, stages, xla
from fluxflow_jax.data import resolve_dataset_config, shapes
from fluxflow_jax.grids import from_uint8, make_grid, save_grid, to_uint8  # noqa: F401 (API)
from fluxflow_jax.lpips import load_lpips_weights, lpips_distance
from fluxflow_jax.models.registry import ModelSet

DATA_RANGE = 2.0  # images live in [-1, 1]
HELDOUT_SEED = 7919  # added to the shapes generator seed: a disjoint held-out set
COLOR_TOLERANCE = 60.0  # RGB distance (0-255 units) within which a pixel counts as a colour


# ----------------------------------------------------------------------------------------------
# image metrics (jnp, per image) - dm-pix, the DeepMind image library


def _check_pair(a: jax.Array, b: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"{name}: expected two NHWC batches of the same shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of NHWC images in [-1, 1] -> ``[N]`` (inf for identical images)."""
    a, b = _check_pair(a, b, "psnr")
    return dm_pix.psnr((a + 1.0) / DATA_RANGE, (b + 1.0) / DATA_RANGE)


def ssim(a: jax.Array, b: jax.Array, *, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Per-image SSIM (Wang et al. 2004) of NHWC images in [-1, 1] -> ``[N]``.

    Computed on the images mapped to [0, 1] with data range 1, the usual convention (SSIM's
    luminance term is not shift invariant, so [-1, 1] with range 2 would give other values).
    Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, valid region, mean over channels and
    positions (dm-pix / tf.image.ssim). Images smaller than the window use a window as large as
    the smaller side (made odd), so 8-16 px test images still get a score.
    """
    a, b = _check_pair(a, b, "ssim")
    size = min(window, a.shape[1], a.shape[2])
    size = size if size % 2 == 1 else size - 1
    return dm_pix.ssim((a + 1.0) / DATA_RANGE, (b + 1.0) / DATA_RANGE, max_val=1.0,
                       filter_size=size, filter_sigma=sigma)


def mean_image_baseline(images: np.ndarray) -> float:
    """Mean PSNR of predicting the set's mean image for every image."""
    x = np.asarray(images, np.float32)
    return float(np.mean(psnr(x, np.broadcast_to(x.mean(0, keepdims=True), x.shape))))


def background_baseline(images: np.ndarray, scenes: Sequence[shapes.ShapeScene]) -> float:
    """Mean PSNR of predicting each shapes image as its background alone (no objects)."""
    x = np.asarray(images, np.float32)
    bg = np.stack([np.broadcast_to(from_uint8(np.asarray(s.background, np.uint8)), x.shape[1:])
                   for s in scenes])
    return float(np.mean(psnr(x, bg)))


# ----------------------------------------------------------------------------------------------
# conditioning scores on shapes data (numpy, from pixels)


def color_masks(images: np.ndarray, tolerance: float = COLOR_TOLERANCE) -> dict[str, np.ndarray]:
    """``{colour: bool [N, H, W]}``: pixels whose nearest palette colour is that one, within
    ``tolerance`` (grey backgrounds and blends are far from every palette colour)."""
    u8 = to_uint8(images).astype(np.float32)
    names = list(shapes.COLORS)
    pal = np.asarray([shapes.COLORS[c] for c in names], np.float32)
    dist = np.linalg.norm(u8[..., None, :] - pal, axis=-1)  # [N, H, W, C]
    nearest = dist.argmin(-1)
    close = dist.min(-1) <= tolerance
    return {c: close & (nearest == i) for i, c in enumerate(names)}


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str) -> bool:
    """Whether centroid ``a`` (y, x) stands ``relation`` of ``b`` (y grows downwards)."""
    if relation == "above":
        return a[0] < b[0]
    if relation == "below":
        return a[0] > b[0]
    if relation == "left of":
        return a[1] < b[1]
    if relation == "right of":
        return a[1] > b[1]
    raise ValueError(f"unknown relation {relation!r}; expected one of {shapes.RELATIONS}")


def conditioning_scores(images: np.ndarray, scenes: Sequence[shapes.ShapeScene], *,
                        min_pixels: int | None = None) -> dict[str, float]:
    """``color_score`` and ``relation_score`` (see the module docstring) of NHWC images in
    [-1, 1] against the scenes their prompts describe. ``min_pixels`` defaults to
    ``max(1, H*W/256)`` pixels per object colour."""
    if len(images) != len(scenes):
        raise ValueError(f"conditioning_scores: {len(images)} images for {len(scenes)} scenes")
    masks = color_masks(images)
    h, w = np.asarray(images).shape[1:3]
    need = int(min_pixels) if min_pixels is not None else max(1, (h * w) // 256)
    colors_ok, n_obj, rel_ok, n_rel = 0, 0, 0, 0
    for i, sc in enumerate(scenes):
        present = {o.color: masks[o.color][i].sum() >= need for o in sc.objects}
        colors_ok += sum(present.values())
        n_obj += len(sc.objects)
        if sc.relation is not None:
            n_rel += 1
            a, b = sc.objects
            if present[a.color] and present[b.color]:
                rel_ok += relation_holds(_centroid(masks[a.color][i]),
                                         _centroid(masks[b.color][i]), sc.relation)
    return {"color_score": float(colors_ok) / max(1, n_obj),
            "relation_score": rel_ok / n_rel if n_rel else float("nan")}


def recon_color_score(reconstructions: np.ndarray,
                      scenes: Sequence[shapes.ShapeScene]) -> float:
    """``color_score`` of the reconstructions of the single-object scenes: does the VAE give
    each object back in its colour (NaN when no scene has one object)."""
    one = [i for i, sc in enumerate(scenes) if len(sc.objects) == 1]
    if not one:
        return float("nan")
    return conditioning_scores(np.asarray(reconstructions)[one],
                               [scenes[i] for i in one])["color_score"]


# ----------------------------------------------------------------------------------------------
# held-out data


def heldout_shapes(ds_cfg: Mapping[str, Any], n: int
                   ) -> tuple[np.ndarray, list[shapes.ShapeScene]]:
    """``n`` shapes images ([-1, 1]) and scenes from the generator under a seed the training set
    never uses (``generator_seed + HELDOUT_SEED``), at the dataset's size."""
    seed = int(ds_cfg.get("generator_seed", 0)) + HELDOUT_SEED
    size = ds_cfg["img_size"]
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    scenes = [shapes.scene(i, seed, int(ds_cfg.get("max_objects", 2))) for i in range(int(n))]
    return np.stack([from_uint8(shapes.render(s, size)) for s in scenes]), scenes


class Evaluator:
    """Held-out metrics of whatever models are present; ``__call__(params) -> flat dict``.

    Reconstruction metrics need compressor + expander; conditioning scores need flow, text
    encoder and expander plus ``scenes``. Compiled functions are built once here.
    """

    def __init__(self, models: ModelSet, *, images: np.ndarray,
                 scenes: Sequence[shapes.ShapeScene] | None = None, tokenizer: Any = None,
                 max_length: int = 128,
                 settings: sampling.SampleSettings = sampling.DEFAULT_SETTINGS,
                 null: str = "zeros", seed: int = 0, lpips_params: Mapping | None = None,
                 mesh: jax.sharding.Mesh | None = None, rng_impl: str | None = None,
                 prefix: str = "eval/", use_context: bool = True):
        self.images = np.asarray(images, np.float32)
        self.scenes = list(scenes) if scenes is not None else None
        self.prefix, self.seed, self.lpips_params = prefix, int(seed), lpips_params
        names = set(models.names())
        self._recon = None
        if {"compressor", "expander"} <= names:
            self._recon = xla.jit(lambda p, x: sampling.reconstruct(models, p, x,
                                                                    use_context=use_context))
        self.gen = None
        if self.scenes is not None and {"flow", "text_encoder", "expander"} <= names:
            if tokenizer is None:
                raise ValueError("Evaluator: conditioning scores need the tokenizer")
            self.gen = sampling.Generator(models, tokenizer, max_length=max_length,
                                          image_hw=self.images.shape[1:3], settings=settings,
                                          null=null, mesh=mesh, rng_impl=rng_impl,
                                          use_context=use_context)
        self._lpips = xla.jit(lpips_distance) if lpips_params is not None else None
        self.last_images: dict[str, np.ndarray] = {}

    def __call__(self, params: Mapping) -> dict[str, float]:
        out: dict[str, float] = {}
        x = self.images
        if self._recon is not None:
            y = np.asarray(self._recon(dict(params), x))
            self.last_images["reconstruction"] = y
            out["psnr"] = float(np.mean(psnr(x, y)))
            out["ssim"] = float(np.mean(ssim(x, y)))
            out["psnr_mean_image"] = mean_image_baseline(x)
            if self.scenes is not None:
                out["psnr_background"] = background_baseline(x, self.scenes)
                out["recon_color_score"] = recon_color_score(y, self.scenes)
            if self._lpips is not None:
                out["lpips"] = float(np.mean(self._lpips(self.lpips_params, x, y)))
        if self.gen is not None:
            g = self.gen(dict(params), [s.caption for s in self.scenes], self.seed)
            self.last_images["generated"] = g
            out.update(conditioning_scores(g, self.scenes))
            data = conditioning_scores(x, self.scenes)
            out.update({f"{k}_data": v for k, v in data.items()})
        return {self.prefix + k: v for k, v in out.items()}


def lpips_paths(config: Mapping | None, flag: str | None) -> list[str]:
    """LPIPS weight files: the flag (comma-separated), else the first stage's
    ``loss.lpips_weights`` that names any."""
    if flag:
        return [p for p in flag.split(",") if p]
    for st in (config or {}).get("stages", {}).values():
        w = st.get("loss", {}).get("lpips_weights", "")
        if w:
            return [w] if isinstance(w, str) else list(w)
    return []


def make_evaluator(config: Mapping, models: ModelSet, tokenizer: Any, stage_cfg: Mapping, *,
                   num: int = 16, mesh: jax.sharding.Mesh | None = None,
                   settings: sampling.SampleSettings | None = None,
                   lpips_weights: str | None = None) -> tuple[Evaluator, dict]:
    """An Evaluator on the held-out split of the stage's dataset; also returns facts about it
    (``held_out``, ``dataset``, ``num``) for reports. Non-shapes data: a fixed batch, not held
    out."""
    name = stage_cfg.get("dataset") or config["default_dataset"]
    ds = resolve_dataset_config(config["datasets"][name], f"datasets.{name}")
    max_length = int(config["max_length"])
    if ds["type"] == "shapes":
        images, scenes = heldout_shapes(ds, num)
    else:
        images = sampling.fixed_images(config["datasets"][name], num, int(config["seed"]) + 1,
                                       tokenizer=tokenizer, max_length=max_length,
                                       name=f"datasets.{name}")
        scenes = None
    loss = stage_cfg.get("loss", {})
    settings = settings or sampling.stage_settings(stage_cfg)
    paths = lpips_paths(config, lpips_weights)
    ev = Evaluator(models, images=images, scenes=scenes, tokenizer=tokenizer,
                   max_length=max_length, settings=settings, null=loss.get("cfg_null", "zeros"),
                   seed=int(config.get("seed", 0)), mesh=mesh, rng_impl=config.get("rng_impl"),
                   lpips_params=load_lpips_weights(paths) if paths else None,
                   use_context=stages.spade_trained(config, stage_cfg.get("name", "")))
    return ev, {"dataset": name, "held_out": ds["type"] == "shapes", "num": len(images)}


# ----------------------------------------------------------------------------------------------
# CLI

BASELINES = {"psnr": ("psnr_mean_image", "psnr_background")}


def format_table(metrics: Mapping[str, float], prefix: str = "eval/") -> str:
    """Metric | value | baselines, one row per metric (baselines beside PSNR)."""
    m = {k.removeprefix(prefix): v for k, v in metrics.items()}
    shown = {b for bs in BASELINES.values() for b in bs}
    rows = [("metric", "value", "baselines")]
    for k, v in m.items():
        if k in shown:
            continue
        base = ", ".join(f"{b} {m[b]:.2f}" for b in BASELINES.get(k, ()) if b in m)
        rows.append((k, f"{v:.4f}", base))
    wa, wb = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{wa}}  {b:>{wb}}  {c}".rstrip() for a, b, c in rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fluxflow_jax.evaluate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--stage")
    ap.add_argument("--weights", default="auto", choices=loading.WEIGHTS)
    ap.add_argument("--num", type=int, default=16, help="held-out images")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--sampler", choices=sampling.SAMPLERS)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--lpips_weights", help="LPIPS safetensors file(s), comma-separated")
    ap.add_argument("--json", help="output JSON (default W/eval/<stage>.json)")
    args = ap.parse_args(argv)
    xla.configure_cpu_host()
    xla.enable_compilation_cache()
    try:
        if args.num < 1:
            raise loading.UserError(f"--num must be >= 1, got {args.num}")
        loaded = loading.load(workdir=args.workdir, stage=args.stage, weights=args.weights,
                              needed={"expander"})
        config, stage_cfg = loaded.run_config, loaded.stage_config()
        if args.seed is not None:
            config = {**config, "seed": args.seed}
        tok = loading.load_tokenizer(loaded, None)
        loss = stage_cfg.get("loss", {})
        settings = sampling.SampleSettings(
            args.sampler or sampling.sampler_for_objective(loss.get("objective", "")),
            int(args.steps or stage_cfg.get("sample_steps", 20)),
            float(args.guidance if args.guidance is not None
                  else stage_cfg.get("guidance_scale", 1.0)))
        ev, facts = make_evaluator(config, loaded.models, tok, stage_cfg, num=args.num,
                                   settings=settings, lpips_weights=args.lpips_weights)
        metrics = ev(loaded.params)
    except (loading.UserError, FileNotFoundError, KeyError, interop.InteropError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.json) if args.json else Path(args.workdir) / "eval" / f"{loaded.stage}.json"
    report = {"stage": loaded.stage, "weights": loaded.weights, "source": loaded.source, **facts,
              "settings": {"sampler": settings.sampler, "steps": settings.steps,
                           "guidance": settings.guidance},
              "metrics": {k: (None if not np.isfinite(v) else v) for k, v in metrics.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"stage {loaded.stage} ({loaded.weights} weights), {facts['num']} "
          f"{'held-out ' if facts['held_out'] else ''}images of {facts['dataset']}")
    print(format_table(metrics))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
