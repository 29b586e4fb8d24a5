"""Sampling: the flow-matching ODE with classifier-free guidance, VAE reconstructions, sample grids.

Convention (``losses.flow_interpolate``): ``x_t = t*x1 + (1-t)*x0`` with ``x0`` noise at ``t=0`` and
data ``x1`` at ``t=1``; the model predicts ``v = x1 - x0``. Sampling integrates ``dx/dt = v`` from
noise to data (Euler, or Heun with ``method='heun'``). Only image tokens move; the HW token is
built from the latent grid and never integrated (the reference's CFG sampler lets it drift, §10.4).
Images are mapped from [-1, 1] to [0, 255] correctly (§10.15).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax import evaluate


def hw_token(batch: int, hw: tuple[int, int], dim: int, max_hw: int) -> jax.Array:
    """``[B, 1, d]`` size token: channel 0 = h/max_hw, channel 1 = w/max_hw (latent units)."""
    tok = jnp.zeros((batch, 1, dim), jnp.float32)
    return tok.at[:, 0, 0].set(hw[0] / max_hw).at[:, 0, 1].set(hw[1] / max_hw)


def sample_flow(velocity: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                cond: jax.Array, null: Optional[jax.Array], *, rng: jax.Array,
                hw: tuple[int, int], dim: int, max_hw: int, steps: int = 20,
                guidance: float = 1.0, method: str = "euler") -> jax.Array:
    """Integrate the flow ODE from Gaussian noise; returns packed latents ``[B, h*w+1, d]``.

    ``velocity(packed, text_emb, t)`` is the flow model. CFG: ``v = v_u + g (v_c - v_u)``;
    ``guidance == 1`` (or ``null is None``) runs only the conditional branch.
    """
    if steps < 1:
        raise ValueError(f"sample steps must be >= 1, got {steps}")
    if method not in ("euler", "heun"):
        raise ValueError(f"sampling method must be 'euler' or 'heun', got {method!r}")
    b = cond.shape[0]
    tok = hw_token(b, hw, dim, max_hw)
    x = jax.random.normal(rng, (b, hw[0] * hw[1], dim), jnp.float32)
    use_cfg = null is not None and guidance != 1.0

    def v(x, t):
        tt = jnp.full((b,), t, jnp.float32)
        if not use_cfg:
            return velocity(jnp.concatenate([x, tok], 1), cond, tt)[:, :-1]
        both = jnp.concatenate([jnp.concatenate([x, tok], 1)] * 2, 0)
        out = velocity(both, jnp.concatenate([cond, null], 0), jnp.concatenate([tt, tt]))[:, :-1]
        vc, vu = out[:b], out[b:]
        return vu + guidance * (vc - vu)

    ts = jnp.linspace(0.0, 1.0, steps + 1)

    def body(i, x):
        t0, t1 = ts[i], ts[i + 1]
        d0 = v(x, t0)
        if method == "euler":
            return x + (t1 - t0) * d0
        x1 = x + (t1 - t0) * d0
        return x + (t1 - t0) * 0.5 * (d0 + v(x1, t1))

    x = jax.lax.fori_loop(0, steps, body, x)
    return jnp.concatenate([x, tok], 1)


class SampleMaker:
    """Sample grids for a stage in ``W/samples/``: reconstructions of a fixed held-out batch for
    VAE stages (with and without SPADE context), generations of the stage's prompts for flow stages.
    Uses EMA weights when the stage keeps them."""

    def __init__(self, config: Mapping, st: Any, workdir: Path):
        from fluxflow_jax import data as data_lib
        self.config, self.st = config, st
        self.out = Path(workdir) / "samples"
        self.active = jax.process_index() == 0
        n = int(config.samples.num_images)
        ds_name = st.cfg.dataset or config.default_dataset
        loader = data_lib.make_loader(
            config.datasets[ds_name], global_batch_size=n, seed=int(config.samples.seed),
            tokenizer=st.tokenizer, max_length=int(config.max_length), process_index=0,
            process_count=1, name=f"datasets.{ds_name}")
        self.batch = next(loader)
        close = getattr(loader, "close", None)
        if close:
            close()
        self.images = jnp.asarray(self.batch["image"])
        f = 2 ** st.models.compressor.downscales if st.models.compressor is not None else 16
        self.hw = (self.images.shape[1] // f, self.images.shape[2] // f)
        self.prompts = list(st.cfg.sample_prompts)
        self._recon = jax.jit(self._recon_fn)
        self._gen = jax.jit(self._gen_fn) if self._is_flow() else None

    def _is_flow(self) -> bool:
        return "flow" in self.st.kinds and bool(self.prompts)

    def _recon_fn(self, params, images):
        m = self.st.models
        packed, _, _ = m.compressor.apply({"params": params["compressor"]}, images, sample=False)
        ctx = m.expander.apply({"params": params["expander"]}, packed, use_context=True, hw=self.hw)
        noctx = m.expander.apply({"params": params["expander"]}, packed, use_context=False,
                                 hw=self.hw)
        return ctx, noctx

    def _gen_fn(self, params, ids, mask, rng):
        m, s = self.st.models, self.st.cfg
        emb = m.text_encoder.apply({"params": params["text_encoder"]}, ids, mask,
                                   deterministic=True)
        if s.loss.cfg_null == "empty_prompt":
            e_ids, e_mask = self._empty
            null = m.text_encoder.apply({"params": params["text_encoder"]}, e_ids, e_mask,
                                        deterministic=True)
            null = jnp.broadcast_to(null, emb.shape)
        else:
            null = jnp.zeros_like(emb)
        vel = lambda x, e, t: m.flow.apply({"params": params["flow"]}, x, e, t, hw=self.hw)
        lat = sample_flow(vel, emb, null, rng=rng, hw=self.hw, dim=m.flow.vae_dim,
                          max_hw=m.flow.max_hw, steps=int(s.sample_steps),
                          guidance=float(s.guidance_scale))
        return m.expander.apply({"params": params["expander"]}, lat, use_context=True, hw=self.hw)

    def make(self, state: Any, step: int) -> list[Path]:
        """Write this step's grids; returns the paths (nothing on non-zero processes)."""
        if not self.active:
            return []
        params = jax.device_get(state.params)
        if state.ema:
            params = {**params, **jax.device_get(state.ema)}
        written = []
        m = self.st.models
        if m.compressor is not None and m.expander is not None and "vae" in self.st.kinds:
            ctx, noctx = self._recon(params, self.images)
            grid = np.concatenate([np.asarray(self.images), np.asarray(ctx), np.asarray(noctx)])
            p = self.out / f"{self.st.name}_recon_step{step:06d}.png"
            evaluate.save_grid(grid, p, nrow=self.images.shape[0])
            written.append(p)
        if self._gen is not None:
            from fluxflow_jax.data import tokenize
            ids, mask = tokenize(self.st.tokenizer, self.prompts, int(self.config.max_length))
            self._empty = tokenize(self.st.tokenizer, [""], int(self.config.max_length))
            imgs = self._gen(params, jnp.asarray(ids), jnp.asarray(mask),
                             jax.random.key(int(self.config.samples.seed),
                                            impl=self.config.rng_impl))
            p = self.out / f"{self.st.name}_gen_step{step:06d}.png"
            evaluate.save_grid(np.asarray(imgs), p, nrow=len(self.prompts), captions=self.prompts)
            written.append(p)
        return written
