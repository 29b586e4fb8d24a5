"""Image outputs and image metrics: [-1,1] -> uint8, sample grids, PSNR and SSIM.

The models work on images in [-1, 1]. The reference saves samples without mapping them to [0, 1]
(REFERENCE.md section 10, item 15), so every negative value is clipped to black; here the mapping
is explicit: ``u8 = floor((x + 1) * 127.5 + 0.5)`` after clipping to [-1, 1], i.e. -1 -> 0, 0 -> 128,
1 -> 255.

PSNR and SSIM are computed on the [-1, 1] images with a data range of 2, which gives exactly the
values of the same images mapped to [0, 1] with a data range of 1 (the usual convention).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # images live in [-1, 1]


# ----------------------------------------------------------------------------------------------------
# uint8 images and grids (host side, numpy)
# ----------------------------------------------------------------------------------------------------


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 in [0, 255] (clipped; NaN -> 0). Any shape; returns numpy."""
    x = np.asarray(jax.device_get(images), dtype=np.float32)
    x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    x = np.clip(x, -1.0, 1.0)
    return np.floor((x + 1.0) * 127.5 + 0.5).astype(np.uint8)


def _as_rgb_nhwc(images) -> np.ndarray:
    x = to_uint8(images)
    if x.ndim == 3:  # one HWC image
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images NHWC (or HWC), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("expected at least one image, got an empty batch")
    c = x.shape[-1]
    if c == 1:
        x = np.repeat(x, 3, axis=-1)
    elif c == 4:
        x = x[..., :3]
    elif c != 3:
        raise ValueError(f"expected 1, 3 or 4 channels (NHWC), got {c} in shape {x.shape}")
    return x


def _columns(n: int, nrow: int | None) -> int:
    ncol = int(nrow) if nrow else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    return min(ncol, n)


def _tile(x: np.ndarray, nrow: int | None, padding: int, pad_value: int) -> np.ndarray:
    n, h, w, _ = x.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    ncol = _columns(n, nrow)
    nrows = math.ceil(n / ncol)
    p = int(padding)
    grid = np.full((nrows * (h + p) + p, ncol * (w + p) + p, 3), pad_value, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = p + r * (h + p), p + c * (w + p)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i]
    return grid


def make_grid(
    images, nrow: int | None = None, *, padding: int = 2, pad_value: int = 0
) -> np.ndarray:
    """Tile NHWC images in [-1, 1] into one uint8 ``[H, W, 3]`` image.

    ``nrow`` is the number of images per row (default ``ceil(sqrt(N))``); ``padding`` pixels of
    ``pad_value`` separate the tiles and surround the grid. Grey images are repeated to RGB, alpha
    is dropped.
    """
    return _tile(_as_rgb_nhwc(images), nrow, padding, pad_value)


def save_grid(
    images,
    path: str | Path,
    nrow: int | None = None,
    captions: Sequence[str] | None = None,
    *,
    padding: int = 2,
) -> Path:
    """Write a sample grid (PNG, or whatever the suffix says) with optional per-image captions.

    Captions (one per image) go in a white strip under each tile, wrapped to the tile width and cut
    at 4 lines.
    """
    from PIL import Image, ImageDraw, ImageFont

    x = _as_rgb_nhwc(images)
    n, h, w, _ = x.shape
    if captions is not None and len(captions) != n:
        raise ValueError(f"save_grid: {len(captions)} captions for {n} images")
    if captions is None:
        img = Image.fromarray(_tile(x, nrow, padding, 0))
    else:
        ncol = _columns(n, nrow)
        nrows = math.ceil(n / ncol)
        font = ImageFont.load_default()
        char_w = max(1, int(font.getlength("M")))
        line_h = int(font.getbbox("Mg")[3]) + 2
        wrapped = [textwrap.wrap(str(c), max(4, w // char_w))[:4] or [""] for c in captions]
        strip_h = line_h * max(len(lines) for lines in wrapped) + 4
        p = int(padding)
        row_h = h + p + strip_h
        img = Image.new("RGB", (ncol * (w + p) + p, nrows * row_h + p), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for i in range(n):
            r, c = divmod(i, ncol)
            x0, y0 = p + c * (w + p), p + r * row_h
            img.paste(Image.fromarray(x[i]), (x0, y0))
            draw.multiline_text(
                (x0, y0 + h + 2), "\n".join(wrapped[i]), fill=(0, 0, 0), font=font, spacing=2
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# metrics (jnp, per image)
# ----------------------------------------------------------------------------------------------------


def _check_pair(a: jax.Array, b: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"{name}: expected two NHWC batches of the same shape, got {a.shape} and {b.shape}"
        )
    return a, b


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of NHWC images in [-1, 1] -> ``[N]`` (inf for identical images)."""
    a, b = _check_pair(a, b, "psnr")
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return 10.0 * jnp.log10(DATA_RANGE**2 / mse)


def _gaussian_window(size: int, sigma: float) -> jax.Array:
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
    g = jnp.exp(-(x**2) / (2.0 * sigma**2))
    return g / jnp.sum(g)


def _filter(x: jax.Array, g: jax.Array) -> jax.Array:
    """Separable 'valid' Gaussian filter of NHWC ``x`` along H and W, per channel."""
    c = x.shape[-1]
    k = g.shape[0]
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.tile(g.reshape(k, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(g.reshape(1, k, 1, 1), (1, 1, 1, c))
    y = jax.lax.conv_general_dilated(
        x,
        kh,
        (1, 1),
        "VALID",
        dimension_numbers=dn,
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )
    return jax.lax.conv_general_dilated(
        y,
        kw,
        (1, 1),
        "VALID",
        dimension_numbers=dn,
        feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST,
    )


def ssim(a: jax.Array, b: jax.Array, *, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Per-image SSIM (Wang et al. 2004) of NHWC images in [-1, 1] -> ``[N]``.

    Gaussian window 11 / sigma 1.5, K1 = 0.01, K2 = 0.03, population statistics, valid region only,
    mean over channels and positions (the tf.image.ssim / skimage ``gaussian_weights`` convention).
    Images smaller than the window use a window as large as the smaller side (made odd).
    """
    a, b = _check_pair(a, b, "ssim")
    size = min(window, a.shape[1], a.shape[2])
    size = size if size % 2 == 1 else size - 1
    g = _gaussian_window(size, sigma)
    c1 = (0.01 * DATA_RANGE) ** 2
    c2 = (0.03 * DATA_RANGE) ** 2
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return jnp.mean(num / den, axis=(1, 2, 3))
