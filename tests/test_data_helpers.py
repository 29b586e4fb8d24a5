"""Helpers shared by the data tests (tiny datasets with every kind of broken input) and checks of
the helpers themselves."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data import load_tokenizer, shapes

TOKENIZER = None


def tok():
    global TOKENIZER
    if TOKENIZER is None:
        TOKENIZER = load_tokenizer()
    return TOKENIZER


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def shape_image(i: int, hw=(32, 32)) -> np.ndarray:
    return shapes.render(shapes.scene(i), hw)


def odd_mode_images() -> dict[str, tuple[bytes, np.ndarray]]:
    """Good images in awkward modes: encoded bytes and the RGB pixels they must decode to."""
    g = (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)
    out = {"gray.png": (encode(g), np.repeat(g[..., None], 3, -1))}
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255          # top half opaque red, bottom half fully transparent
    want = np.full((32, 32, 3), 255, np.uint8)
    want[:16] = (200, 0, 0)
    out["rgba.png"] = (encode(rgba), want)
    pal = Image.fromarray(np.where(np.arange(32)[None, :] < 16, 0, 1).astype(np.uint8)
                          .repeat(32, 0), "P")
    pal.putpalette([10, 200, 30, 240, 20, 90] + [0] * 762)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    want = np.zeros((32, 32, 3), np.uint8)
    want[:, :16] = (10, 200, 30)
    want[:, 16:] = (240, 20, 90)
    out["palette.png"] = (buf.getvalue(), want)
    v16 = np.full((32, 32), 65535, np.uint16)
    v16[:, 16:] = 32896  # 128 * 257
    buf = io.BytesIO()
    Image.fromarray(v16).save(buf, format="PNG")  # mode I;16
    want = np.full((32, 32, 3), 255, np.uint8)
    want[:, 16:] = 128
    out["deep16.png"] = (buf.getvalue(), want)
    return out


def build_broken_folder(root: Path, n_good: int = 8, fmt: str = "tsv") -> tuple[dict, dict]:
    """A folder dataset: ``n_good`` shapes PNGs, the odd-mode images, and one of every kind of
    bad entry. Returns (dataset config, expected counts per reason)."""
    root.mkdir(parents=True, exist_ok=True)
    lines: list[bytes] = []

    def line(name: str, cap: str) -> bytes:
        if fmt == "tsv":
            return f"{name}\t{cap}".encode()
        return json.dumps({"image": name, "caption": cap}).encode()

    for i in range(n_good):
        (root / f"good{i}.png").write_bytes(encode(shape_image(i)))
        lines.append(line(f"good{i}.png", shapes.scene(i).caption))
    for name, (data, _) in odd_mode_images().items():
        (root / name).write_bytes(data)
        lines.append(line(name, "an odd image"))
    (root / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    (root / "zero.png").write_bytes(b"")
    full = encode(shape_image(99))
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    jpg = encode(shape_image(98), "JPEG")
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    for name in ("corrupt.png", "zero.png", "missing.png", "truncated.png", "truncated.jpg"):
        lines.append(line(name, "a broken image"))
    (root / "good_extra.png").write_bytes(encode(shape_image(50)))
    if fmt == "tsv":
        lines.append(b"no tab on this line")
    else:
        lines.append(b"{not json")
    lines.append(line("good_extra.png", "   "))                 # empty caption
    lines.append(b"good_extra.png\t\xff\xfe broken utf8" if fmt == "tsv"
                 else b'{"image": "good_extra.png", "caption": "\xff\xfe"}')
    lines.append(b"")                                         # blank line in the middle
    lines.append(line("good_extra.png", "a shape"))
    cap_file = root / ("captions.txt" if fmt == "tsv" else "captions.jsonl")
    cap_file.write_bytes(b"\n".join(lines) + b"\n")
    cfg = {"type": "folder" if fmt == "tsv" else "jsonl", "image_folder": str(root),
           "captions_file": str(cap_file), "img_size": 32, "resize_mode": "fixed",
           "max_length": 16}
    expected = {"unreadable_image": 1, "empty_file": 1, "missing_file": 1, "truncated_image": 2,
                "malformed_line": 1, "empty_caption": 1, "bad_utf8": 1, "empty_line": 1}
    return cfg, expected


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for k, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), k
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"batch {k} key {key}")


def row_keys(batches: list[dict]) -> list[str]:
    """One hash per sample (image + tokens) to compare sample sets across loaders."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            h = hashlib.sha1()
            for key in sorted(b):
                h.update(np.ascontiguousarray(b[key][r]).tobytes())
            out.append(h.hexdigest())
    return out


def check_resume(make, k: int, m: int) -> None:
    """Batches k..k+m-1 of an uninterrupted loader equal those of a loader restored from the
    JSON round-tripped state after k batches; the counters agree too."""
    ref = make()
    take(ref, k)
    state = json.loads(json.dumps(ref.get_state()))
    want = take(ref, m)
    resumed = make()
    resumed.set_state(state)
    got = take(resumed, m)
    assert_same_batches(want, got)
    assert ref.stats() == resumed.stats()
    assert ref.get_state() == resumed.get_state()
    ref.close()
    resumed.close()


# ----------------------------------------------------------------------------- self-checks

def test_odd_mode_images_really_have_odd_modes():
    modes = {name: Image.open(io.BytesIO(data)).mode for name, (data, _) in
             odd_mode_images().items()}
    assert modes["gray.png"] == "L"
    assert modes["rgba.png"] == "RGBA"
    assert modes["palette.png"] == "P"
    assert modes["deep16.png"] in ("I;16", "I")


def test_broken_folder_has_what_it_claims(tmp_path):
    cfg, expected = build_broken_folder(tmp_path / "d")
    root = Path(cfg["image_folder"])
    assert (root / "zero.png").stat().st_size == 0
    assert not (root / "missing.png").exists()
    with pytest.raises(OSError):
        Image.open(root / "truncated.png").load()
    assert sum(expected.values()) == 9
