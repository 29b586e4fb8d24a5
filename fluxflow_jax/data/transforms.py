"""Image decoding, RGB conversion, aspect buckets, resize/crop/flip and [-1, 1] scaling.

Pure functions of (image, config, rng) so that a sample's pixels depend only on its index, the
seed and the epoch - never on which thread decoded it. The model needs H and W to be multiples of
16; every path here guarantees that and, unlike the reference (REFERENCE.md section 10 item 15),
never resizes a batch's odd image to the majority size: batches are formed per bucket upstream.

Bucket modes (``resize_mode='bucket'``):
  * ``buckets='auto'``: a list of equal-area sizes around ``img_size`` (aspect up to
    ``max_aspect``); each image goes to the bucket whose aspect ratio is closest in log space
    (ties: smallest area), is resized to cover it and cropped (center or random): no distortion.
  * ``buckets=[[h, w], ...]``: the same with an explicit list.
  * ``buckets='native'``: the reference's rule - the near-native size on the 16-grid with minimum
    aspect distortion (``min_distortion_size``), stretched to it; here capped so the long side does
    not exceed ``max(img_size)`` (the reference had no cap).
``resize_mode='fixed'``: resize to cover ``img_size`` and crop to it.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from fluxflow_jax.data.errors import BadSample

LANCZOS = Image.Resampling.LANCZOS


def open_image(src: bytes | str | os.PathLike) -> Image.Image:
    """Open (header only) an image from a path or encoded bytes; raises BadSample with a reason.

    Decompression bombs are refused from the header (``too_large``), before any pixel is
    decoded: PIL only *warns* between ``MAX_IMAGE_PIXELS`` and twice that, and a 20000x20000
    PNG of a few kB would take 1.2 GB per decode thread. The limit is checked here rather than
    by turning the warning into an error, because warning filters are process-global and the
    decode threads would race on them.
    """
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise BadSample("empty_file", "0 bytes")
            fp = io.BytesIO(src)
        else:
            path = os.fspath(src)
            try:
                size = os.path.getsize(path)
            except OSError:
                raise BadSample("missing_file", path) from None
            if size == 0:
                raise BadSample("empty_file", path)
            fp = path
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise BadSample("unreadable_image", str(e)) from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = "truncated_image" if "truncat" in str(e).lower() else "unreadable_image"
        raise BadSample(reason, str(e)) from None
    limit = Image.MAX_IMAGE_PIXELS
    w, h = img.size
    if limit is not None and w * h > limit:
        img.close()
        raise BadSample("too_large", f"{w}x{h} pixels is more than Image.MAX_IMAGE_PIXELS={limit}")
    return img


def check_min_size(width: int, height: int, min_size: int) -> None:
    """An image whose shorter side is below ``min_size`` is a BadSample (``too_small``): it
    would be upscaled into a training sample made of interpolation."""
    if min(width, height) < min_size:
        raise BadSample("too_small", f"{width}x{height} is below min_size={min_size}")


def load_pixels(img: Image.Image) -> Image.Image:
    """Force decoding; truncated or corrupt pixel data becomes a BadSample (never a crash).

    Damage is only *reported* by PIL while ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its
    default); a program that sets it True gets grey-padded images here, silently.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_large", str(e)) from None
    except OSError as e:
        reason = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
        raise BadSample(reason, str(e)) from None
    except Exception as e:  # PIL raises assorted types (SyntaxError, struct.error, ...)
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    Alpha (RGBA, LA, P with transparency) is composited on white rather than dropped: dropping it
    exposes whatever colour the transparent pixels happen to hold (often black). 16/32-bit integer
    images are rescaled from 0..65535, float images from 0..1 (or clipped at 255); PIL's own
    ``convert('RGB')`` would clip them to white.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        scale = 255.0 / 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 1.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


# ----------------------------------------------------------------------------- buckets

def auto_buckets(img_size: Sequence[int], max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Equal-area ``(h, w)`` sizes on the 16-grid around ``img_size``, aspect in
    ``[1/max_aspect, max_aspect]``; always contains ``img_size`` itself."""
    h0, w0 = int(img_size[0]), int(img_size[1])
    area = h0 * w0
    out = {(h0, w0)}
    h = 16
    while h * 16 <= area:
        w = max(16, int(round(area / h / 16.0)) * 16)
        if 1.0 / max_aspect <= w / h <= max_aspect:
            out.add((h, w))
        h += 16
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Bucket ``(h, w)`` whose aspect ratio is closest to ``width/height`` in log space; ties go
    to the smallest area (as the reference's grid search breaks its ties)."""
    ratio = width / height
    best = min(buckets, key=lambda b: (abs(math.log((b[1] / b[0]) / ratio)), b[0] * b[1], b[0]))
    return int(best[0]), int(best[1])


def min_distortion_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The reference's ``resize_preserving_aspect_min_distortion`` size rule, as ``(w, h)``.

    Over every (w, h) on the 16-grid in ``[ceil16(min_size), floor16(max_size)]^2`` pick the one
    minimising ``|log((w/h)/(width/height))|``; ties go to the smallest area (then row-major order
    of the reference's meshgrid: smaller h first, then smaller w).
    """
    lo = int(math.ceil(min_size / 16)) * 16
    hi = int(math.floor(max_size / 16)) * 16
    if lo > hi:
        raise ValueError(f"invalid size range [{min_size}, {max_size}] after rounding to 16")
    sizes = np.arange(lo, hi + 1, 16)
    ws, hs = np.meshgrid(sizes, sizes)
    dist = np.abs(np.log((ws / hs) / (width / height)))
    cand = np.where(dist == dist.min())
    cw, ch = ws[cand], hs[cand]
    k = int(np.argmin(cw * ch))
    return int(cw[k]), int(ch[k])


def native_bucket(width: int, height: int, cap: int | None) -> tuple[int, int]:
    """The reference's per-image size (``upscale_image``): short side rounded up to 16, long side
    rounded up to 16, min-distortion choice in between; returned as ``(h, w)``.

    ``cap`` first scales the image down so its long side is at most ``cap`` (the reference ignored
    ``img_size``; a 4000-pixel photo would have become a 4000-pixel training sample).
    """
    if cap is not None and max(width, height) > cap:
        s = cap / max(width, height)
        width, height = max(1, int(round(width * s))), max(1, int(round(height * s)))
    short, long_ = min(width, height), max(width, height)
    hi = max(16, int(math.ceil(long_ / 16)) * 16)
    lo = min(max(16, short), hi)
    w, h = min_distortion_size(width, height, lo, hi)
    return h, w


def bucket_list(cfg: Mapping) -> list[tuple[int, int]] | None:
    """The configured bucket list, or None for 'native' (per-image sizes)."""
    if cfg["resize_mode"] == "fixed":
        return [tuple(cfg["img_size"])]
    b = cfg["buckets"]
    if b == "native":
        return None
    if b == "auto":
        return auto_buckets(cfg["img_size"], cfg["max_aspect"])
    return [tuple(x) for x in b]


def assign_bucket(width: int, height: int, cfg: Mapping,
                  buckets: Sequence[Sequence[int]] | None) -> tuple[int, int]:
    """``(h, w)`` a ``width x height`` image becomes under ``cfg``."""
    if buckets is None:
        return native_bucket(width, height, max(cfg["img_size"]))
    if len(buckets) == 1:
        return int(buckets[0][0]), int(buckets[0][1])
    return nearest_bucket(width, height, buckets)


# ----------------------------------------------------------------------------- resize

def _cover_size(w: int, h: int, bw: int, bh: int) -> tuple[int, int]:
    s = max(bw / w, bh / h)
    return max(bw, int(math.ceil(w * s - 1e-6))), max(bh, int(math.ceil(h * s - 1e-6)))


def resize_crop(img: Image.Image, bucket: Sequence[int], *, stretch: bool, crop: str,
                flip: bool, rng: np.random.Generator | None) -> np.ndarray:
    """Decode ``img`` (opened, not yet loaded) into a uint8 ``[h, w, 3]`` array of size ``bucket``.

    ``stretch``: resize straight to the bucket (the reference's 'native' rule). Otherwise resize to
    cover the bucket and crop (center, or at a random offset from ``rng``). JPEGs are decoded at a
    reduced DCT scale first when much larger than the target (``draft``), which is exact to PIL's
    scaler and several times faster on big photos.
    """
    bh, bw = int(bucket[0]), int(bucket[1])
    w, h = img.size
    tw, th = (bw, bh) if stretch else _cover_size(w, h, bw, bh)
    if img.format == "JPEG" and (w >= 2 * tw and h >= 2 * th):
        try:
            img.draft("RGB", (tw, th))
        except Exception:  # draft is an optimisation only
            pass
    img = to_rgb(load_pixels(img))
    w, h = img.size
    if not stretch:
        tw, th = _cover_size(w, h, bw, bh)
    if (w, h) != (tw, th):
        img = img.resize((tw, th), LANCZOS)
    arr = np.asarray(img, dtype=np.uint8)
    if not stretch and (th, tw) != (bh, bw):
        if crop == "random" and rng is not None:
            y0 = int(rng.integers(0, th - bh + 1))
            x0 = int(rng.integers(0, tw - bw + 1))
        else:
            y0, x0 = (th - bh) // 2, (tw - bw) // 2
        arr = arr[y0:y0 + bh, x0:x0 + bw]
    if flip and rng is not None and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 in ``[-1, 1]`` (the reference's ToTensor + Normalize(0.5,
    0.5))."""
    return images.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_float` for saving samples (maps [-1, 1] to [0, 255], clipping)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def normalize_caption(text: str, prefix: str | None) -> str:
    """Collapse whitespace (newlines and tabs too) and apply ``fixed_prompt_prefix`` as the
    reference does (``f"{prefix}. {caption}"``); an empty result is a BadSample."""
    text = " ".join(text.split())
    if not text:
        raise BadSample("empty_caption")
    if prefix:
        text = f"{prefix}. {text}"
    return text


def decode_caption(raw: bytes | str) -> str:
    """Bytes -> str, strictly UTF-8 (a mis-encoded caption is counted, not guessed at)."""
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_utf8", str(e)) from None

