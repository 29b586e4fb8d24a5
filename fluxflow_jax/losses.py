"""Pure loss functions of the training engine (REFERENCE.md section 2), jnp only.

Images are NHWC in [-1, 1]; latents ``mu/logvar`` are [B, ...] (any layout: KL reduces over every
non-batch axis). Where the reference has a bug (REFERENCE.md section 10) the function here is the
fixed version and its docstring says what differs:

* ``histogram_loss`` is differentiable (soft binning); the reference's ``torch.histc`` gives zero
  gradient, so its 0.02 * hist term never trained anything (item 11).
* ``adaptive_weights`` balances loss *magnitudes*: the reference divides by signed averages, so a
  negative hinge-G average made ``w_gan`` negative and flipped the generator objective (item 11).
* ``ddpm_model_time`` feeds the flow model a float t in [0, 1] instead of the integer index the
  reference passed, which collapsed every t >= 1 onto one time embedding (item 2).
* ``cfg_dropout`` is a function the flow step actually calls, with an optional empty-prompt
  null embedding (item 5).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------------------------------------
# the loss schema: every key a stage's ``loss`` block accepts, defined once


class LossKey(NamedTuple):
    """One loss setting: its default, the rule a value must satisfy, and what it does."""

    default: Any
    doc: str
    choices: tuple = ()  # allowed values (empty: any value passing ``check``)
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # the check in words, for error messages


_NONNEG = {"check": lambda v: isinstance(v, (int, float)) and v >= 0, "rule": ">= 0"}
_BOOL = {"check": lambda v: isinstance(v, bool), "rule": "a bool"}
TIMESTEP_MODES = ("uniform", "logit_normal", "content", "style", "balanced")

LOSS_SCHEMA: dict[str, LossKey] = {
    # VAE (REFERENCE.md 3.3 defaults)
    "kl_beta": LossKey(1e-4, "final KL weight beta (cosine warm-up from 0)", **_NONNEG),
    "kl_warmup_steps": LossKey(5000, "steps of the stage over which beta warms up", **_NONNEG),
    "kl_free_bits": LossKey(0.0, "free nats per latent element before KL counts", **_NONNEG),
    "sample_posterior": LossKey(True, "sample z ~ q(z|x) (False: z = mu, a deterministic "
                                "encoder - learns much faster early on)", **_BOOL),
    "mse_weight": LossKey(0.1, "weight of MSE beside the L1 reconstruction term", **_NONNEG),
    "adaptive_weights": LossKey(True, "balance recon/KL/GAN by their running means (the "
                                "reference's rule; can pin the VAE at the mean image)", **_BOOL),
    "color_stats_weight": LossKey(0.05, "per-channel mean/std matching weight", **_NONNEG),
    "hist_weight": LossKey(0.02, "soft colour-histogram loss weight", **_NONNEG),
    "contrast_weight": LossKey(0.1, "local contrast loss weight", **_NONNEG),
    "lambda_lpips": LossKey(0.1, "LPIPS weight (stages with 'lpips' in train)", **_NONNEG),
    "lpips_weights": LossKey("", "our LPIPS weights file (python -m fluxflow_jax.convert lpips)",
                             check=lambda v: isinstance(v, str), rule="a path string"),
    # GAN
    "lambda_adv": LossKey(0.5, "generator hinge-loss weight", **_NONNEG),
    "r1_gamma": LossKey(5.0, "R1 penalty weight on real images", **_NONNEG),
    "r1_interval": LossKey(16, "apply R1 every n discriminator steps (lazy R1)",
                           check=lambda v: isinstance(v, int) and v >= 1, rule="an int >= 1"),
    # flow
    "objective": LossKey("flow_matching", "flow matching, or the reference's v-prediction DDPM",
                         choices=("flow_matching", "v_prediction")),
    "timestep_sampling": LossKey("logit_normal", "how training draws t", choices=TIMESTEP_MODES),
    "loss_weighting": LossKey("uniform", "per-sample weight of the flow loss over t",
                              choices=("uniform", "bell_shaped")),
    "cfg_dropout_prob": LossKey(0.1, "probability of dropping the text (classifier-free "
                                "guidance training)",
                                check=lambda v: isinstance(v, (int, float)) and 0 <= v < 1,
                                rule="in [0, 1)"),
    "cfg_null": LossKey("zeros", "the dropped text: zero embedding or the empty prompt's",
                        choices=("zeros", "empty_prompt")),
}


def loss_defaults() -> dict[str, Any]:
    """Every loss key with its default."""
    return {k: v.default for k, v in LOSS_SCHEMA.items()}


def loss_errors(cfg: Mapping[str, Any], prefix: str = "loss") -> list[str]:
    """Problems of a ``loss`` block as ``'<prefix>.<key>: <problem>'`` lines (empty when valid)."""
    errs = [f"{prefix}.{k}: unknown key (known: {sorted(LOSS_SCHEMA)})"
            for k in cfg if k not in LOSS_SCHEMA]
    for k, spec in LOSS_SCHEMA.items():
        if k not in cfg:
            continue
        v = cfg[k]
        if spec.choices and v not in spec.choices:
            errs.append(f"{prefix}.{k}: {v!r} not in {spec.choices}")
        elif spec.check is not None and not spec.check(v):
            errs.append(f"{prefix}.{k}: must be {spec.rule}, got {v!r}")
    return errs

# ---------------------------------------------------------------------------------------------
# reconstruction


def _avg_pool3(x: jax.Array) -> jax.Array:
    """3x3 mean, stride 1, zero padding 1, divisor always 9 (count_include_pad=True). NHWC."""
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1),
                              ((0, 0), (1, 1), (1, 1), (0, 0)))
    return s / 9.0


def frequency_l1(pred: jax.Array, target: jax.Array, hf_weight: float = 0.5) -> jax.Array:
    """``L1(lf(p), lf(t)) + hf_weight * L1(p - lf(p), t - lf(t))`` (the reference uses 0.5)."""
    pl, tl = _avg_pool3(pred), _avg_pool3(target)
    return jnp.mean(jnp.abs(pl - tl)) + hf_weight * jnp.mean(jnp.abs((pred - pl) - (target - tl)))


def reconstruction_loss(pred: jax.Array, target: jax.Array, mse_weight: float = 0.1) -> jax.Array:
    """The VAE's recon term without LPIPS: ``frequency_l1 + mse_weight * MSE``."""
    return frequency_l1(pred, target) + mse_weight * jnp.mean(jnp.square(pred - target))


# ---------------------------------------------------------------------------------------------
# KL


def kl_standard_normal(mu: jax.Array, logvar: jax.Array, free_bits: float = 0.0,
                       normalize_by_dims: bool = True, reduce: str = "mean") -> jax.Array:
    """KL(N(mu, e^logvar) || N(0, 1)) per element, floored at ``free_bits`` nats per element.

    ``normalize_by_dims`` averages over the non-batch axes (what training uses), else sums (the
    legacy scale). ``reduce``: 'mean' or 'sum' over the batch, 'none' per sample.
    """
    kl = -0.5 * (1.0 + logvar - jnp.square(mu) - jnp.exp(logvar))
    if free_bits > 0:
        kl = jnp.maximum(kl, free_bits)  # zero gradient below the floor, as torch.clamp
    axes = tuple(range(1, kl.ndim))
    per = jnp.mean(kl, axis=axes) if normalize_by_dims else jnp.sum(kl, axis=axes)
    if reduce == "mean":
        return jnp.mean(per)
    if reduce == "sum":
        return jnp.sum(per)
    if reduce == "none":
        return per
    raise ValueError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")


def kl_beta(step: jax.Array, warmup_steps: int, beta_max: float) -> jax.Array:
    """Cosine KL-weight warm-up ``beta_max * (1 - cos(pi * clip(step / W, 0, 1))) / 2``.

    Written as ``beta_max * sin^2(pi/2 * frac)``, the same value without float32 cancellation near
    step 0. ``W <= 0`` gives ``beta_max``. The reference feeds the *global* step.
    """
    if warmup_steps <= 0:
        return jnp.asarray(beta_max, jnp.float32)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) * (1.0 / warmup_steps), 0.0, 1.0)
    return beta_max * jnp.square(jnp.sin((0.5 * math.pi) * frac))


# ---------------------------------------------------------------------------------------------
# colour / contrast / histogram regularisers (first 3 channels, as the reference's c loop)


def _std(x: jax.Array, axis=None) -> jax.Array:
    return jnp.std(x, axis=axis, ddof=1)  # torch .std() is unbiased


def color_stats_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over RGB of (mean_p - mean_t)^2 + (std_p - std_t)^2, statistics over B*H*W."""
    p, t = pred[..., :3], target[..., :3]
    ax = (0, 1, 2)
    return jnp.mean(jnp.square(p.mean(ax) - t.mean(ax)) + jnp.square(_std(p, ax) - _std(t, ax)))


def contrast_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``(sum_c (std p_c / (std t_c + 1e-8) - 1)^2 + MSE(std_b p, std_b t)) / 4``.

    Per-channel std over B*H*W (RGB), per-sample std over H*W*C (all channels); unbiased.
    """
    ax = (0, 1, 2)
    ratio = _std(pred[..., :3], ax) / (_std(target[..., :3], ax) + 1e-8)
    b = pred.shape[0]
    ps, ts = _std(pred.reshape(b, -1), 1), _std(target.reshape(b, -1), 1)
    return (jnp.sum(jnp.square(ratio - 1.0)) + jnp.mean(jnp.square(ps - ts))) / 4.0


def soft_histogram(x: jax.Array, bins: int = 64, lo: float = -1.0, hi: float = 1.0) -> jax.Array:
    """Normalised histogram with linear (triangular-kernel) bin assignment; differentiable in x.

    Each value in [lo, hi] splits its unit mass between the two nearest bin centres in proportion
    to its distance (values below the first / above the last centre go wholly to the end bin);
    values outside [lo, hi] are ignored, as torch.histc does. O(N) memory (a scatter-add).
    """
    x = x.reshape(-1)
    width = (hi - lo) / bins
    u = jnp.clip((x - lo) / width - 0.5, 0.0, bins - 1.0)  # position in bin-centre units
    i0 = jnp.clip(jnp.floor(u), 0, bins - 2).astype(jnp.int32)
    frac = u - i0
    inside = ((x >= lo) & (x <= hi)).astype(x.dtype)
    h = jnp.zeros((bins,), x.dtype)
    h = h.at[i0].add((1.0 - frac) * inside).at[i0 + 1].add(frac * inside)
    return h / (jnp.sum(h) + 1e-8)


def histogram_loss(pred: jax.Array, target: jax.Array, bins: int = 64) -> jax.Array:
    """Mean over RGB of mean_bins |CDF_p - CDF_t| of 64-bin histograms over [-1, 1].

    Unlike the reference (torch.histc: no gradient, section 10 item 11) the bins are soft
    (``soft_histogram``), so this term has a nonzero gradient with respect to ``pred``. Values are
    close to, not equal to, the hard-binned ones.
    """
    per_c = []
    for c in range(3):
        hp = soft_histogram(pred[..., c], bins)
        ht = soft_histogram(target[..., c], bins)
        per_c.append(jnp.mean(jnp.abs(jnp.cumsum(hp) - jnp.cumsum(ht))))
    return sum(per_c) / 3.0


# ---------------------------------------------------------------------------------------------
# GAN


def _per_sample_mean(logits: jax.Array) -> jax.Array:
    return logits.reshape(logits.shape[0], -1).mean(axis=1)


def d_hinge_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """``mean_b relu(1 - mean_patch real) + mean_b relu(1 + mean_patch fake)``."""
    return (jnp.mean(jax.nn.relu(1.0 - _per_sample_mean(real_logits)))
            + jnp.mean(jax.nn.relu(1.0 + _per_sample_mean(fake_logits))))


def g_hinge_loss(fake_logits: jax.Array) -> jax.Array:
    """``-mean_b mean_patch fake`` (unweighted; the VAE step multiplies by lambda_adv)."""
    return -jnp.mean(_per_sample_mean(fake_logits))


def r1_penalty_and_logits(d_fn: Callable, real: jax.Array, gamma: float,
                          has_aux: bool = False):
    """R1 on real images plus D's output from the same forward pass (the hinge term reuses it).

    ``penalty = gamma * 0.5 * mean_b sum_{hwc} (d/dx sum_b mean_patch D(x))^2`` - the reference's
    scale, not multiplied by the lazy interval. ``d_fn(x) -> logits`` (or ``(logits, aux)`` with
    ``has_aux``); returns ``(penalty, logits)`` or ``(penalty, (logits, aux))``. Differentiable with
    respect to D's parameters closed over in ``d_fn`` (double backprop).
    """
    def summed(x):
        out = d_fn(x)
        logits = out[0] if has_aux else out
        return jnp.sum(_per_sample_mean(logits)), out

    grad, out = jax.grad(summed, has_aux=True)(real)
    r1 = jnp.mean(jnp.sum(jnp.square(grad).reshape(grad.shape[0], -1), axis=1))
    return gamma * 0.5 * r1, out


def r1_penalty(d_fn: Callable[[jax.Array], jax.Array], real: jax.Array, gamma: float) -> jax.Array:
    """``gamma * 0.5 * R1`` (see ``r1_penalty_and_logits``)."""
    return r1_penalty_and_logits(d_fn, real, gamma)[0]


def r1_due(step, interval: int):
    """Lazy R1: whether this D step adds the penalty (``step % interval == 0``, as the
    reference)."""
    if interval <= 0:
        raise ValueError(f"r1_interval must be > 0, got {interval}")
    return step % interval == 0


# ---------------------------------------------------------------------------------------------
# adaptive loss weights


def adaptive_weights(averages: Mapping[str, float]) -> dict:
    """Inverse-magnitude balancing of the VAE loss terms from their running averages.

    ``w_x = mean_{y: |a_y| > 0} |a_y| / (|a_x| + 1e-8)``, and ``w_x = 1`` when ``a_x == 0``. The
    reference uses the signed averages, so a negative hinge-G average gives a negative ``w_gan``
    (section 10 item 11); with magnitudes every weight is >= 0. Pass only the active losses
    (the reference sets w_recon / w_gan to 0 when that loss is off). Works on floats and on
    jnp scalars under jit; the caller should treat the weights as constants (stop_gradient).
    """
    mags = {k: jnp.abs(jnp.asarray(v, jnp.float32)) for k, v in averages.items()}
    if not mags:
        return {}
    stacked = jnp.stack(list(mags.values()))
    n = jnp.sum(stacked > 0)
    target = jnp.where(n > 0, jnp.sum(stacked) / jnp.maximum(n, 1), 0.0)
    return {k: jnp.where((m > 0) & (n > 0), target / (m + 1e-8), 1.0) for k, m in mags.items()}


def loss_history_init(names, size: int = 100) -> dict:
    """Rolling buffers (the reference's FloatBuffer(100)) as a jit-friendly pytree."""
    return {"values": {k: jnp.zeros((size,), jnp.float32) for k in names},
            "count": {k: jnp.zeros((), jnp.int32) for k in names}}


def loss_history_push(hist: dict, values: Mapping[str, jax.Array]) -> dict:
    """Append one value per named loss (the oldest drops out once the buffer is full)."""
    new_v, new_c = dict(hist["values"]), dict(hist["count"])
    for k, v in values.items():
        buf = hist["values"][k]
        new_v[k] = buf.at[hist["count"][k] % buf.shape[0]].set(jnp.asarray(v, jnp.float32))
        new_c[k] = hist["count"][k] + 1
    return {"values": new_v, "count": new_c}


def loss_history_averages(hist: dict) -> dict:
    """Mean of the buffered values per loss (0 while empty, as FloatBuffer.average)."""
    out = {}
    for k, buf in hist["values"].items():
        n = jnp.minimum(hist["count"][k], buf.shape[0])
        out[k] = jnp.where(n > 0, jnp.sum(buf) / jnp.maximum(n, 1), 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# flow matching (x_t = t*x1 + (1-t)*x0, x0 noise, x1 data, target x1 - x0)


def sample_timesteps(rng: jax.Array, batch: int, mode: str = "uniform", *, mean: float = 0.0,
                     std: float = 1.0, shift: float = 1.0) -> jax.Array:
    """t in (0, 1), float32 [batch], for the flow-matching objective (t = 1 is clean data).

    * ``uniform``: U(0, 1).
    * ``logit_normal``: sigmoid(N(mean, std)) (SD3's default, mean 0 std 1 concentrates mid-t).
    * ``content``: low noise, sigmoid(N(+shift, std)) - t near 1, where fine content is refined.
    * ``style``: high noise, sigmoid(N(-shift, std)) - t near 0, where global layout/colour form.
    * ``balanced``: each sample is ``content`` or ``style`` with probability 1/2 (both ends).
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep mode must be one of {TIMESTEP_MODES}, got {mode!r}")
    k1, k2 = jax.random.split(rng)
    if mode == "uniform":
        return jax.random.uniform(k1, (batch,), jnp.float32)
    n = jax.random.normal(k1, (batch,), jnp.float32) * std
    if mode == "logit_normal":
        return jax.nn.sigmoid(mean + n)
    if mode == "content":
        return jax.nn.sigmoid(shift + n)
    if mode == "style":
        return jax.nn.sigmoid(-shift + n)
    sign = jnp.where(jax.random.bernoulli(k2, 0.5, (batch,)), 1.0, -1.0)
    return jax.nn.sigmoid(sign * shift + n)


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim)).astype(x.dtype)


def flow_interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = t * x1 + (1 - t) * x0`` with t [B] broadcast over the trailing axes."""
    tb = _bcast(t, x0)
    return tb * x1 + (1.0 - tb) * x0


def flow_loss_weights(t: jax.Array, weighting: str = "uniform") -> jax.Array:
    """Per-sample loss weights. ``bell_shaped``: the logit-normal(0, 1) density at t.

    Weighting by that density is, in expectation, the same objective as sampling t logit-normally
    (SD3); its mean under uniform t is 1, so the loss scale is unchanged. Peak 1.6 at t = 0.5.
    """
    if weighting == "uniform":
        return jnp.ones_like(t, dtype=jnp.float32)
    if weighting == "bell_shaped":
        tc = jnp.clip(t.astype(jnp.float32), 1e-5, 1.0 - 1e-5)
        logit = jnp.log(tc) - jnp.log1p(-tc)
        return jnp.exp(-0.5 * jnp.square(logit)) / (math.sqrt(2 * math.pi) * tc * (1.0 - tc))
    raise ValueError(f"flow loss weighting must be 'uniform' or 'bell_shaped', got {weighting!r}")


def flow_matching_loss(pred: jax.Array, x0: jax.Array, x1: jax.Array, t: jax.Array,
                       weighting: str = "uniform") -> jax.Array:
    """``mean_b w(t_b) * mean((pred - (x1 - x0))^2)``: velocity regression for rectified flow."""
    per = jnp.mean(jnp.square(pred - (x1 - x0)).reshape(pred.shape[0], -1), axis=1)
    return jnp.mean(flow_loss_weights(t, weighting) * per)


# ---------------------------------------------------------------------------------------------
# the reference's v-prediction DDPM objective (kept to continue training its checkpoints)


@functools.lru_cache(maxsize=4)
def _ddpm_np(num_steps: int, beta_start: float, beta_end: float):
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return betas.astype(np.float32), np.cumprod(1.0 - betas).astype(np.float32)


def ddpm_schedule(num_steps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> dict[str, jax.Array]:
    """Linear-beta DDPM schedule: ``{'betas', 'alphas_cumprod'}`` float32 [num_steps].

    Products are taken in float64 then rounded (diffusers accumulates in float32; the two agree
    to ~1e-6 relative). alphas_cumprod[0] = 0.9999, [499] = 0.0786, [999] = 4.0e-5.
    """
    b, ab = _ddpm_np(num_steps, beta_start, beta_end)
    return {"betas": jnp.asarray(b), "alphas_cumprod": jnp.asarray(ab)}


def ddpm_timestep_weights(num_steps: int = 1000) -> np.ndarray:
    """The reference's sampling weights over indices: ``cos(((i/(N-1)) + 0.008)/1.008 * pi/2)^2``.

    Monotonically decreasing: favours low-noise indices (mean ~296), not the middle.
    """
    s = np.linspace(0.0, 1.0, num_steps)
    w = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return w / w.sum()


def sample_ddpm_timesteps(rng: jax.Array, batch: int, num_steps: int = 1000) -> jax.Array:
    """Integer indices [batch] in [0, num_steps) drawn with ``ddpm_timestep_weights``."""
    logw = jnp.log(jnp.asarray(ddpm_timestep_weights(num_steps), jnp.float32) + 1e-30)
    return jax.random.categorical(rng, logw, shape=(batch,)).astype(jnp.int32)


def _ab(t_index: jax.Array, alphas_cumprod: jax.Array | None, like: jax.Array) -> jax.Array:
    ab = ddpm_schedule()["alphas_cumprod"] if alphas_cumprod is None else alphas_cumprod
    return _bcast(jnp.take(ab, t_index), like)


def ddpm_add_noise(x0: jax.Array, eps: jax.Array, t_index: jax.Array,
                   alphas_cumprod: jax.Array | None = None) -> jax.Array:
    """``sqrt(ab_t) x0 + sqrt(1 - ab_t) eps`` (diffusers' add_noise, without its quirk of giving
    index 0 the sigma of index 1 after ``set_timesteps``)."""
    ab = _ab(t_index, alphas_cumprod, x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def v_prediction_target(x0: jax.Array, eps: jax.Array, t_index: jax.Array,
                        alphas_cumprod: jax.Array | None = None) -> jax.Array:
    """``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``; then ``x0 = sqrt(ab) x_t - sqrt(1 - ab) v``."""
    ab = _ab(t_index, alphas_cumprod, x0)
    return jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0


def ddpm_model_time(t_index: jax.Array, num_steps: int = 1000) -> jax.Array:
    """Float model time for a DDPM index: ``min((index + 0.5) / (N - 1), 1)``.

    The flow model maps t to its embedding index with ``floor(999 t)``. The reference passed the
    raw integer index, so every index >= 1 hit embedding 999 (section 10 item 2). ``index / 999``
    is not enough under XLA: its division is not correctly rounded and floor(999 * (i / 999))
    returns i - 1 for 170 of the 1000 indices (measured on CPU); the half-step offset makes
    ``floor(999 t) == index`` for every index.
    """
    n = num_steps - 1
    return jnp.minimum((jnp.asarray(t_index, jnp.float32) + 0.5) * (1.0 / n), 1.0)


# ---------------------------------------------------------------------------------------------
# classifier-free guidance


def cfg_dropout(rng: jax.Array, text_emb: jax.Array, p: float,
                null_emb: jax.Array | None = None) -> jax.Array:
    """Replace each batch row with the null embedding with probability ``p``.

    ``null_emb`` (e.g. the encoder's output for the empty prompt, what the reference's
    FluxFlowPipeline uses at sampling time) broadcasts against one row; None means zeros (what
    the reference's training used). The reference never passed a nonzero p (section 10 item 5).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cfg_dropout_prob must be in [0, 1], got {p}")
    if p == 0.0:
        return text_emb
    row = text_emb.shape[1:]
    if null_emb is None:
        null = jnp.zeros(row, text_emb.dtype)
    else:
        null = jnp.asarray(null_emb, text_emb.dtype)
        if null.ndim == text_emb.ndim and null.shape[0] == 1:  # [1, ...] -> one row
            null = null[0]
        try:
            null = jnp.broadcast_to(null, row)
        except ValueError as e:
            raise ValueError(f"null_emb of shape {jnp.shape(null_emb)} does not broadcast to one "
                             f"row of text_emb {text_emb.shape}") from e
    drop = jax.random.uniform(rng, (text_emb.shape[0],)) < p
    drop = drop.reshape((-1,) + (1,) * len(row))
    return jnp.where(drop, null[None], text_emb)
