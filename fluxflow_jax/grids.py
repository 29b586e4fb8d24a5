"""Images a person reads: [-1, 1] -> uint8, tiled grids with row labels and wrapped captions.

The models work on images in [-1, 1]. The reference saves samples without mapping them to [0, 1]
(REFERENCE.md section 10, item 15), so every negative value is clipped to black; here the mapping
is explicit: ``u8 = floor((x + 1) * 127.5 + 0.5)`` after clipping to [-1, 1], i.e. -1 -> 0,
0 -> 128, 1 -> 255.

Training images are often 16-32 px: a grid of such tiles is unreadable, so ``save_grid`` can
upscale tiles (nearest neighbour, whole factors, so pixels stay pixels) to at least ``min_tile``
pixels, label each row (``input`` / ``reconstruction`` / ...) and wrap captions at word boundaries.
This module is host-side numpy/PIL only and imports nothing else of the package, so both the
sampler and the evaluator can use it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_CAPTION_LINES = 4


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 in [0, 255] (clipped; NaN -> 0). Any shape; returns numpy."""
    x = np.asarray(jax.device_get(images), dtype=np.float32)
    x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    x = np.clip(x, -1.0, 1.0)
    return np.floor((x + 1.0) * 127.5 + 0.5).astype(np.uint8)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the inverse of :func:`to_uint8` on every level)."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def as_rgb_nhwc(images) -> np.ndarray:
    """uint8 NHWC RGB from NHWC/HWC floats in [-1, 1] with 1, 3 or 4 channels."""
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


def upscale_factor(h: int, w: int, min_tile: int) -> int:
    """Smallest whole factor that makes the shorter side of an ``h x w`` tile >= ``min_tile``."""
    return max(1, math.ceil(int(min_tile) / max(1, min(h, w))))


def _columns(n: int, nrow: int | None) -> int:
    ncol = int(nrow) if nrow else math.ceil(math.sqrt(n))
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    return min(ncol, n)


def _tile(x: np.ndarray, nrow: int | None, padding: int, pad_value: int) -> np.ndarray:
    n, h, w, _ = x.shape
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
    return _tile(as_rgb_nhwc(images), nrow, padding, pad_value)


def wrap_caption(text: str, width: float, max_lines: int = MAX_CAPTION_LINES,
                 measure=len) -> list[str]:
    """Lines no wider than ``width`` (as ``measure`` counts: characters by default, pixels with
    a font's ``getlength``), broken at spaces only; a single word wider than a line is cut with
    ``~``; more than ``max_lines`` lines end in ``...``."""
    lines: list[str] = []
    for word in str(text).split():
        if lines and measure(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
            continue
        if measure(word) > width:
            cut = len(word) - 1
            while cut > 1 and measure(word[:cut] + "~") > width:
                cut -= 1
            word = word[:cut] + "~"
        lines.append(word)
    lines = lines or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and measure(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def save_grid(
    images,
    path: str | Path,
    nrow: int | None = None,
    captions: Sequence[str] | None = None,
    *,
    padding: int = 2,
    row_labels: Sequence[str] | None = None,
    min_tile: int = 0,
) -> Path:
    """Write a sample grid (PNG, or whatever the suffix says); returns the path.

    ``captions`` (one per image) go in a white strip under each tile, wrapped at word boundaries
    to the tile width. ``row_labels`` (one per grid row) are written in a column on the left.
    ``min_tile`` > 0 upscales tiles by a whole factor (nearest) to at least that many pixels.
    With neither captions nor labels the grid is exactly :func:`make_grid` of the upscaled tiles.
    """
    x = as_rgb_nhwc(images)
    f = upscale_factor(x.shape[1], x.shape[2], min_tile) if min_tile else 1
    if f > 1:
        x = np.repeat(np.repeat(x, f, axis=1), f, axis=2)
    n, h, w, _ = x.shape
    ncol = _columns(n, nrow)
    nrows = math.ceil(n / ncol)
    if captions is not None and len(captions) != n:
        raise ValueError(f"save_grid: {len(captions)} captions for {n} images")
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"save_grid: {len(row_labels)} row labels for {nrows} rows")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if captions is None and row_labels is None:
        Image.fromarray(_tile(x, nrow, padding, 0)).save(path)
        return path
    font = ImageFont.load_default()
    line_h = int(font.getbbox("Mg")[3]) + 2
    wrapped = ([wrap_caption(c, w - 2, measure=font.getlength) for c in captions]
               if captions is not None else None)
    strip_h = line_h * max(len(lines) for lines in wrapped) + 4 if wrapped else 0
    label_w = (max(int(font.getlength(str(s))) for s in row_labels) + 8) if row_labels else 0
    p = int(padding)
    row_h = h + p + strip_h
    img = Image.new("RGB", (label_w + ncol * (w + p) + p, nrows * row_h + p), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for r in range(nrows if row_labels else 0):
        draw.text((4, p + r * row_h + h // 2 - line_h // 2), str(row_labels[r]), fill=(0, 0, 0),
                  font=font)
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = label_w + p + c * (w + p), p + r * row_h
        img.paste(Image.fromarray(x[i]), (x0, y0))
        if wrapped is not None:
            draw.multiline_text((x0, y0 + h + 2), "\n".join(wrapped[i]), fill=(0, 0, 0),
                                font=font, spacing=2)
    img.save(path)
    return path
