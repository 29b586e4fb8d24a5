"""Samplers: pure functions of (flow apply fn, params, conditioning, rng) -> packed latents.

Flow matching (``losses.flow_interpolate``): ``x_t = t*x1 + (1-t)*x0`` with noise ``x0`` at ``t=0``
and data ``x1`` at ``t=1``; the model predicts ``v = x1 - x0`` and the samplers integrate
``dx/dt = v`` from noise to data on a uniform grid: ``euler`` (first order) or ``heun`` (second
order, two model calls per step).

``vpred`` is the sampler for the reference's v-prediction DDPM objective (REFERENCE.md 1.7, 2.3):
its training-side schedule, DPM-Solver++(2M) over linear betas 1e-4..0.02 with trailing timesteps,
first-order first and last steps and a final sigma of zero, done the way the reference evidently
meant rather than the way it ran (section 10): the start is pure Gaussian noise (not a compressed
noise image or a randomly re-noised training image), the model receives the same float time its
trainer gave it (``losses.ddpm_model_time``, not the raw index of item 2 or ``t/1000``), the betas
are the ones it was trained with (item 3), and only image tokens move (item 4).

Everywhere: the HW size token is built from the latent grid and held fixed; classifier-free
guidance is ``v = v_u + g (v_c - v_u)`` with ``g == 1`` running only the conditional branch and
``g == 0`` only the unconditional one (the reference's cfg_utils); the unconditional branch uses
``null`` (zeros, the empty prompt, or a negative prompt's embedding - a negative prompt replaces
the unconditional branch). The whole loop is one ``lax.fori_loop`` inside the caller's jit. Noise
is drawn per image from ``fold_in(key(seed), image_index)``, so an image depends on its seed and
index only, not on the batch it was generated in.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax import data as data_lib
from fluxflow_jax import grids, losses, sharding, stages, xla
from fluxflow_jax.config_defaults import SAMPLERS
from fluxflow_jax.models.registry import ModelSet
from fluxflow_jax.models.vae import hw_token

NULL_MODES = ("zeros", "empty_prompt")
# (params, packed [B, T+1, d], text_emb [B, E], t [B] float) -> packed [B, T+1, d]
FlowApply = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How to sample: ``sampler`` in SAMPLERS, ``steps`` >= 1, CFG ``guidance`` >= 0."""

    sampler: str = "euler"
    steps: int = 20
    guidance: float = 1.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if int(self.steps) < 1:
            raise ValueError(f"sample steps must be >= 1, got {self.steps}")
        if float(self.guidance) < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance}")


DEFAULT_SETTINGS = SampleSettings()


def stage_settings(stage_cfg: Mapping) -> SampleSettings:
    """A stage's sampling settings: its ``sampler`` (default: the one matching its objective),
    ``sample_steps`` and ``guidance_scale``."""
    sampler = stage_cfg.get("sampler") or sampler_for_objective(
        stage_cfg.get("loss", {}).get("objective", "flow_matching"))
    return SampleSettings(sampler, int(stage_cfg.get("sample_steps", 20)),
                          float(stage_cfg.get("guidance_scale", 1.0)))


def sampler_for_objective(objective: str) -> str:
    """The sampler that matches a training objective (``loss.objective``)."""
    return "vpred" if objective == "v_prediction" else "euler"


def image_keys(seed_key: jax.Array, indices: jax.Array) -> jax.Array:
    """One key per image: ``fold_in(seed_key, index)`` (index = the image's number in the run)."""
    return jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(jnp.asarray(indices, jnp.uint32))


def initial_noise(keys: jax.Array, n_tokens: int, dim: int) -> jax.Array:
    """``[B, n_tokens, dim]`` standard normal image tokens, row b from ``keys[b]``."""
    return jax.vmap(lambda k: jax.random.normal(k, (n_tokens, dim), jnp.float32))(keys)


# ----------------------------------------------------------------------------------------------
# The v-prediction schedule (DPM-Solver++ 2M, trailing spacing, final sigma 0)


def vpred_schedule(steps: int, num_train_steps: int = 1000) -> dict[str, np.ndarray]:
    """Per-step constants of the reference's v-prediction sampler, float32 numpy.

    ``timesteps [n]`` (trailing: ``round(arange(N, 0, -N/n)) - 1``), ``alpha``/``sigma [n]`` of
    each step's input (``x = alpha x0 + sigma eps``), and the update
    ``x' = a x + b x0 + c (x0 - x0_prev)``: first order (``c = 0``) on the first and last steps,
    the 2M midpoint correction between; the last step has ``sigma' = 0`` so it returns ``x0``.
    """
    n = int(steps)
    with jax.ensure_compile_time_eval():  # constants, also when called under jit
        ab = np.asarray(losses.ddpm_schedule(num_train_steps)["alphas_cumprod"], np.float64)
    ts = np.round(np.arange(num_train_steps, 0, -num_train_steps / n)).astype(np.int64) - 1
    if len(ts) != n:
        raise ValueError(f"vpred sampler: {n} steps do not fit {num_train_steps} train steps")
    alpha, sigma = np.sqrt(ab[ts]), np.sqrt(1.0 - ab[ts])
    lam = np.log(alpha) - np.log(sigma)
    a, b, c = np.zeros(n), np.zeros(n), np.zeros(n)
    for i in range(n):
        if i == n - 1:  # sigma_next = 0: lambda = inf, exp(-h) = 0 -> x' = x0
            a[i], b[i] = 0.0, 1.0
            continue
        alpha_t, sigma_t = alpha[i + 1], sigma[i + 1]
        h = lam[i + 1] - lam[i]
        a[i] = sigma_t / sigma[i]
        b[i] = -alpha_t * np.expm1(-h)
        if i > 0:
            r0 = (lam[i] - lam[i - 1]) / h
            c[i] = -0.5 * alpha_t * np.expm1(-h) / r0
    f32 = lambda v: np.asarray(v, np.float32)
    return {"timesteps": ts, "alpha": f32(alpha), "sigma": f32(sigma), "a": f32(a), "b": f32(b),
            "c": f32(c)}


# ----------------------------------------------------------------------------------------------
# The samplers


def guided_velocity(flow_apply: FlowApply, params: Any, cond: jax.Array,
                    null: jax.Array | None, guidance: float
                    ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``v(x [B, T, d], hw_tok [B, 1, d], t scalar) -> [B, T, d]`` with classifier-free guidance.

    ``guidance == 1`` (or no ``null``) calls only the conditional branch, ``0`` only the
    unconditional one; otherwise one batched call on ``[cond; null]`` (twice the batch).
    """
    g = float(guidance)

    def v(x: jax.Array, tok: jax.Array, t: jax.Array) -> jax.Array:
        b = x.shape[0]
        packed = jnp.concatenate([x, tok], 1)
        tt = jnp.full((b,), t, jnp.float32)
        if null is None or g == 1.0:
            return flow_apply(params, packed, cond, tt)[:, :-1]
        if g == 0.0:
            return flow_apply(params, packed, null, tt)[:, :-1]
        out = flow_apply(params, jnp.concatenate([packed, packed], 0),
                         jnp.concatenate([cond, jnp.broadcast_to(null, cond.shape)], 0),
                         jnp.concatenate([tt, tt]))[:, :-1]
        vc, vu = out[:b], out[b:]
        return vu + g * (vc - vu)

    return v


def solve(flow_apply: FlowApply, params: Any, noise: jax.Array, tok: jax.Array, cond: jax.Array,
          null: jax.Array | None, settings: SampleSettings) -> jax.Array:
    """Integrate from ``noise [B, T, d]`` with the fixed size token ``tok [B, 1, d]``; returns
    packed latents ``[B, T+1, d]`` (the token unchanged)."""
    v = guided_velocity(flow_apply, params, cond, null, settings.guidance)
    n = int(settings.steps)
    x = noise.astype(jnp.float32)
    if settings.sampler in ("euler", "heun"):
        ts = jnp.linspace(0.0, 1.0, n + 1)

        def body(i, x):
            t0, t1 = ts[i], ts[i + 1]
            d0 = v(x, tok, t0)
            if settings.sampler == "euler":
                return x + (t1 - t0) * d0
            x1 = x + (t1 - t0) * d0
            return x + (t1 - t0) * 0.5 * (d0 + v(x1, tok, t1))

        x = jax.lax.fori_loop(0, n, body, x)
    else:
        s = {k: jnp.asarray(val) for k, val in vpred_schedule(n).items()}
        model_t = losses.ddpm_model_time(s["timesteps"])

        def body(i, carry):
            x, x0_prev = carry
            vel = v(x, tok, model_t[i])
            x0 = s["alpha"][i] * x - s["sigma"][i] * vel
            x = s["a"][i] * x + s["b"][i] * x0 + s["c"][i] * (x0 - x0_prev)
            return x, x0

        x, _ = jax.lax.fori_loop(0, n, body, (x, jnp.zeros_like(x)))
    return jnp.concatenate([x, tok], 1)


def sample_latents(flow_apply: FlowApply, params: Any, cond: jax.Array, null: jax.Array | None,
                   keys: jax.Array, *, hw: tuple[int, int], dim: int, max_hw: int,
                   settings: SampleSettings) -> jax.Array:
    """Packed latents ``[B, h*w+1, d]`` for text embeddings ``cond [B, E]``, one key per row."""
    noise = initial_noise(keys, hw[0] * hw[1], dim)
    return solve(flow_apply, params, noise, hw_token(cond.shape[0], hw, dim, max_hw), cond, null,
                 settings)


# ----------------------------------------------------------------------------------------------
# Whole models: text -> image, image -> image


def encode_text(models: ModelSet, params: Mapping, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Text embeddings ``[B, E]`` (eval mode)."""
    te = models.require("text_encoder", "text conditioning")
    return te.apply({"params": params["text_encoder"]}, ids, mask,
                    deterministic=True).astype(jnp.float32)


def text_to_image(models: ModelSet, params: Mapping, ids: jax.Array, mask: jax.Array,
                  keys: jax.Array, *, image_hw: tuple[int, int], settings: SampleSettings,
                  null_ids: tuple[jax.Array, jax.Array] | None = None,
                  use_context: bool = True) -> jax.Array:
    """Images ``[B, H, W, 3]`` in [-1, 1] for token ids ``[B, L]``; jit it with the static args.

    ``null_ids`` = ``(ids [1|B, L], mask)`` of the unconditional branch (the empty prompt or a
    negative prompt); None uses a zero embedding (what the reference's training dropped to).
    ``use_context``: decode with SPADE context - only right for a VAE trained with it (the
    reference decodes with it always, REFERENCE.md section 10 item 14).
    """
    flow = models.require("flow", "text-to-image sampling")
    exp = models.require("expander", "decoding samples")
    f = 2 ** exp.upscales
    hw = (image_hw[0] // f, image_hw[1] // f)
    cond = encode_text(models, params, ids, mask)
    if null_ids is None:
        null = jnp.zeros_like(cond)
    else:
        null = jnp.broadcast_to(encode_text(models, params, *null_ids), cond.shape)
    apply = lambda p, x, e, t: flow.apply({"params": p}, x, e, t, hw=hw)
    lat = sample_latents(apply, params["flow"], cond, null, keys, hw=hw, dim=flow.vae_dim,
                         max_hw=flow.max_hw, settings=settings)
    return exp.apply({"params": params["expander"]}, lat, use_context=use_context, hw=hw)


def reconstruct(models: ModelSet, params: Mapping, images: jax.Array, *,
                use_context: bool = True) -> jax.Array:
    """Deterministic VAE round trip (posterior mean, no sampling) of NHWC images in [-1, 1]."""
    comp = models.require("compressor", "reconstruction")
    exp = models.require("expander", "reconstruction")
    packed, _, _ = comp.apply({"params": params["compressor"]}, images, sample=False)
    f = 2 ** comp.downscales
    hw = (images.shape[1] // f, images.shape[2] // f)
    return exp.apply({"params": params["expander"]}, packed, use_context=use_context, hw=hw)


def sampling_params(params: Mapping, ema: Mapping | None) -> dict:
    """The weights to sample with: EMA weights where the run keeps them, raw ones elsewhere.
    A collective in multi-process runs (``sharding.to_host``): every process calls it."""
    return {**sharding.to_host(dict(params)), **(sharding.to_host(dict(ema)) if ema else {})}


def pad_rows(n: int, mesh: jax.sharding.Mesh) -> int:
    """Rows to add to a batch of ``n`` so it splits over the mesh's data axes."""
    return (-n) % sharding.data_size(mesh)


class Generator:
    """Text -> images with one compiled sampling loop per (batch, size, settings), batch on the
    mesh's data axes (default: this host's devices), params replicated.
    ``__call__(params, prompts, seed, first_index)``."""

    def __init__(self, models: ModelSet, tokenizer: Any, *, max_length: int,
                 image_hw: tuple[int, int], settings: SampleSettings, null: str = "zeros",
                 negative: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 rng_impl: str | None = None, use_context: bool = True):
        if null not in NULL_MODES:
            raise ValueError(f"null must be one of {NULL_MODES}, got {null!r}")
        self.models, self.tokenizer, self.max_length = models, tokenizer, int(max_length)
        self.settings, self.rng_impl = settings, rng_impl
        # Default: this host's devices, so process 0 alone can sample during multi-host training.
        self.mesh = (mesh if mesh is not None
                     else sharding.make_mesh(devices=jax.local_devices()))
        self._local = all(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        uncond = negative if negative is not None else ("" if null == "empty_prompt" else None)
        self.null_ids = (None if uncond is None else
                         tuple(jnp.asarray(a) for a in self._tokenize([uncond])))
        self.image_hw = tuple(int(s) for s in image_hw)
        self._fn = xla.jit(lambda p, ids, mask, base, idx, nl: text_to_image(
            models, p, ids, mask, image_keys(base, idx), image_hw=self.image_hw,
            settings=settings, null_ids=nl, use_context=use_context))

    def _tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return data_lib.tokenize(self.tokenizer, list(texts), self.max_length)

    def __call__(self, params: Mapping, prompts: Sequence[str], seed: int,
                 first_index: int = 0) -> np.ndarray:
        """Images ``[len(prompts), H, W, 3]`` in [-1, 1] (numpy); image i uses index
        ``first_index + i`` under ``seed``."""
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts to sample")
        pad = pad_rows(n, self.mesh)
        ids, mask = self._tokenize(list(prompts) + [""] * pad)
        idx = np.arange(first_index, first_index + n + pad, dtype=np.int32)
        rows = {"ids": ids, "mask": mask, "idx": idx}
        if self._local:  # a host-local mesh: plain placement, rows split over its devices
            batch = jax.device_put(rows, sharding.batch_sharding(self.mesh))
        else:  # a global mesh: every process calls with its own rows
            batch = sharding.put_batch(rows, self.mesh)
        rep = sharding.replicated(self.mesh)
        p = jax.device_put({k: params[k] for k in ("text_encoder", "flow", "expander")}, rep)
        base = jax.random.key(int(seed), impl=self.rng_impl)
        out = self._fn(p, batch["ids"], batch["mask"], base, batch["idx"], self.null_ids)
        return np.asarray(jax.device_get(out))[:n]


class SampleMaker:
    """Training-time sample grids in ``out_dir``: reconstructions of a fixed batch (rows: input /
    reconstruction / reconstruction without SPADE context) and generations of fixed prompts
    (captioned), tiles upscaled to >= 64 px. ``make(params, step)`` writes them; pass the
    weights to show (``sampling_params(state.params, state.ema)`` for EMA where kept)."""

    def __init__(self, models: ModelSet, out_dir: str | Path, name: str, *, tokenizer: Any = None,
                 max_length: int = 128, images: np.ndarray | None = None,
                 prompts: Sequence[str] = (), settings: SampleSettings = DEFAULT_SETTINGS,
                 image_hw: tuple[int, int] | None = None, seed: int = 0, null: str = "zeros",
                 mesh: jax.sharding.Mesh | None = None, rng_impl: str | None = None,
                 min_tile: int = 64, use_context: bool = True):
        self.out, self.name, self.seed, self.min_tile = Path(out_dir), name, int(seed), min_tile
        self.use_context = bool(use_context)
        self.active = jax.process_index() == 0
        self.images = None if images is None else jnp.asarray(images, jnp.float32)
        if self.images is not None:
            models.require("compressor", "reconstruction samples")
            models.require("expander", "reconstruction samples")
            self._recon = xla.jit(lambda p, x: (reconstruct(models, p, x, use_context=use_context),
                                                reconstruct(models, p, x, use_context=False)))
        self.prompts = list(prompts)
        self.gen = None
        if self.prompts:
            hw = image_hw or (None if self.images is None else tuple(self.images.shape[1:3]))
            if hw is None:
                raise ValueError(f"SampleMaker({name!r}): give image_hw (or images) to size the "
                                 "generated samples")
            self.gen = Generator(models, tokenizer, max_length=max_length, image_hw=hw,
                                 settings=settings, null=null, mesh=mesh, rng_impl=rng_impl,
                                 use_context=use_context)

    def make(self, params: Mapping, step: int) -> list[Path]:
        """Write this step's grids; returns the paths (nothing on non-zero processes)."""
        if not self.active:
            return []
        params = jax.device_get(dict(params))
        written = []
        if self.images is not None:
            ctx, noctx = self._recon(params, self.images)
            rows, labels = [self.images, noctx], ["input", "reconstruction"]
            if self.use_context:  # a SPADE-trained VAE: show both decodes
                rows, labels = [self.images, ctx, noctx], ["input", "reconstruction",
                                                           "recon. no SPADE"]
            grid = np.concatenate([np.asarray(r) for r in rows])
            p = self.out / f"{self.name}_recon_step{step:06d}.png"
            written.append(grids.save_grid(grid, p, nrow=self.images.shape[0],
                                           min_tile=self.min_tile, row_labels=labels))
        if self.gen is not None:
            imgs = self.gen(params, self.prompts, self.seed)
            p = self.out / f"{self.name}_gen_step{step:06d}.png"
            written.append(grids.save_grid(imgs, p, nrow=len(self.prompts),
                                           captions=self.prompts, min_tile=self.min_tile))
        return written


def fixed_images(ds_cfg: Mapping, n: int, seed: int, *, tokenizer: Any, max_length: int,
                 name: str = "samples") -> np.ndarray:
    """``n`` images (NHWC, [-1, 1]) from a dataset config, the same for a given seed: the fixed
    batch whose reconstructions the sample grids show over training."""
    loader = data_lib.make_loader(ds_cfg, global_batch_size=int(n), seed=int(seed),
                                  tokenizer=tokenizer, max_length=int(max_length),
                                  process_index=0, process_count=1, name=name)
    try:
        batch = next(loader)
    finally:
        close = getattr(loader, "close", None)
        if close:
            close()
    return np.asarray(batch["image"], np.float32)


def stage_sample_maker(config: Mapping, stage: str, models: ModelSet, tokenizer: Any,
                       workdir: str | Path, *, mesh: jax.sharding.Mesh | None = None
                       ) -> SampleMaker:
    """The SampleMaker of pipeline stage ``stage`` from the run config: reconstructions of
    ``config.samples.num_images`` fixed images when the stage trains the VAE, generations of
    ``sample_prompts`` (sampler matching ``loss.objective``, ``sample_steps``,
    ``guidance_scale``, ``loss.cfg_null``) when it trains the flow model; grids in ``W/samples``."""
    s = config["stages"][stage]
    kinds = stages.step_kinds(s)
    ds_name = stages.dataset_name(config, s)
    smp = config["samples"]
    images = fixed_images(config["datasets"][ds_name], int(smp["num_images"]), int(smp["seed"]),
                          tokenizer=tokenizer, max_length=int(config["max_length"]),
                          name=f"datasets.{ds_name}")
    prompts = list(s["sample_prompts"]) if "flow" in kinds else []
    settings = stage_settings(s)
    return SampleMaker(models, Path(workdir) / "samples", stage, tokenizer=tokenizer,
                       max_length=int(config["max_length"]),
                       images=images if "vae" in kinds else None, prompts=prompts,
                       settings=settings, image_hw=tuple(images.shape[1:3]),
                       seed=int(smp["seed"]), null=s["loss"]["cfg_null"], mesh=mesh,
                       rng_impl=config["rng_impl"],
                       use_context=stages.spade_trained(config, stage))
