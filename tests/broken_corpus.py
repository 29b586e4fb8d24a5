"""A generated corpus of broken data: every kind of bad image, caption line and shard entry the
loaders must survive, next to good and convertible samples they must use.

API (used by ``test_data_broken_corpus.py``; a training-stage test can use it the same way):

    corpus = build_folder_corpus(root, fmt="tsv" | "jsonl")   # folder / jsonl dataset
    corpus = build_webdataset_corpus(root)                     # tar shards
    corpus.config            dataset config for ``make_loader`` (32x32 fixed, max_length 16)
    corpus.good              {caption: float32 [32, 32, 3] image in [-1, 1]}: every usable sample
    corpus.skipped           {reason: count}: what ``loader.stats()`` must report per reason
    corpus.kinds             {kind name: reason or "good"}: one entry per planted case
    corpus.outside           folder holding files that must never be opened
    with watch_opens(corpus.outside) as opened: ...   # paths under it opened meanwhile

Every good sample has its own caption and its own pixels, so a batch row identifies its sample.
The images are exactly 32x32 (no resize), so the expected pixels are exact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import struct
import sys
import tarfile
import threading
import zlib
from pathlib import Path

import numpy as np
from test_data_helpers import encode, odd_mode_images, shape_image

from fluxflow_jax.data.transforms import to_float

HW = (32, 32)
WORDS = ("red", "blue", "green", "small", "large", "circle", "square", "triangle", "left",
         "right", "top", "bottom")


@dataclasses.dataclass
class Corpus:
    config: dict
    good: dict            # caption -> expected float image
    skipped: dict         # reason -> count
    kinds: dict           # kind -> reason or "good"
    outside: Path


def caption(i: int) -> str:
    """A distinct caption per good sample (distinct after tokenisation too)."""
    return f"a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} shape number {i}"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims ``width x height`` pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def corrupt_body_jpeg(i: int) -> bytes:
    """A complete JPEG (SOI..EOI, right length) whose entropy-coded body holds a second SOI
    marker: PIL reports 'broken data stream' when decoding the pixels."""
    jpg = encode(shape_image(i, HW), "JPEG")
    mid = jpg.find(b"\xff\xda") + (len(jpg) - jpg.find(b"\xff\xda")) // 2
    return jpg[:mid] + b"\xff\xd8" + jpg[mid:]


def bad_crc_png(i: int) -> bytes:
    data = bytearray(encode(shape_image(i, HW)))
    data[data.find(b"IDAT") + 10] ^= 0xFF
    return bytes(data)


def truncated(data: bytes, frac: float = 0.5) -> bytes:
    return data[: int(len(data) * frac)]


def _good_images(n: int) -> list[tuple[str, bytes, np.ndarray]]:
    """``n`` shapes PNGs plus the odd-mode ones (gray, RGBA, palette, 16-bit: convertible)."""
    out = [(f"good{i}.png", encode(shape_image(i, HW)), shape_image(i, HW)) for i in range(n)]
    out += [(name, data, want) for name, (data, want) in odd_mode_images().items()]
    return out


def _outside(root: Path) -> Path:
    out = root / "outside"
    out.mkdir(parents=True, exist_ok=True)
    (out / "secret.png").write_bytes(encode(shape_image(77, HW)))
    (out / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    return out


def build_folder_corpus(root: Path, fmt: str = "tsv", n_good: int = 6) -> Corpus:
    """A folder (``fmt='tsv'``) or JSONL dataset in ``root/data`` with ``root/outside`` next to
    it; see the module docstring."""
    root = Path(root)
    outside = _outside(root)
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    lines: list[bytes] = []
    good: dict = {}
    kinds: dict = {}
    skipped: dict = {}

    def line(name: str, cap: str) -> bytes:
        if fmt == "tsv":
            return f"{name}\t{cap}".encode()
        return json.dumps({"image": name, "caption": cap}).encode()

    def add(kind: str, reason: str, raw: bytes) -> None:
        kinds[kind] = reason
        lines.append(raw)
        if reason != "good":
            skipped[reason] = skipped.get(reason, 0) + 1

    for k, (name, data, want) in enumerate(_good_images(n_good)):
        (d / name).write_bytes(data)
        cap = caption(k)
        good[cap] = to_float(want)
        add(f"good {name}", "good", line(name, cap))
    k = len(good)
    # a symlink that stays inside the folder is an ordinary sample
    os.symlink("good0.png", d / "inner_link.png")
    good[caption(k)] = to_float(shape_image(0, HW))
    add("symlink inside the folder", "good", line("inner_link.png", caption(k)))
    # a sub-folder path is fine too
    (d / "sub").mkdir()
    (d / "sub" / "deep.png").write_bytes(encode(shape_image(40, HW)))
    good[caption(k + 1)] = to_float(shape_image(40, HW))
    add("image in a sub-folder", "good", line("sub/deep.png", caption(k + 1)))

    # --- paths that lead out of the folder: never opened
    add("traversal ../", "outside_folder", line("../outside/secret.png", "stolen"))
    add("deep traversal", "outside_folder", line("sub/../../outside/passwd", "stolen"))
    add("absolute path", "outside_folder", line(str(outside / "secret.png"), "stolen"))
    os.symlink(outside / "secret.png", d / "escape.png")
    add("symlink escape", "outside_folder", line("escape.png", "stolen"))
    os.symlink(outside, d / "linkdir")
    add("symlinked directory escape", "outside_folder", line("linkdir/passwd", "stolen"))

    # --- images that cannot be used
    files = {
        "tiny.png": (encode(np.full((8, 8, 3), 200, np.uint8)), "too_small"),
        "thin.png": (encode(np.full((4, 64, 3), 90, np.uint8)), "too_small"),
        "truncated.png": (truncated(encode(shape_image(90, HW))), "truncated_image"),
        "truncated.jpg": (truncated(encode(shape_image(91, HW), "JPEG"), 0.4),
                          "truncated_image"),
        "corrupt_body.jpg": (corrupt_body_jpeg(92), "corrupt_image"),
        "bad_crc.png": (bad_crc_png(93), "corrupt_image"),
        "bomb.png": (bomb_png(100_000, 100_000), "too_large"),
        "bomb_warn.png": (bomb_png(10_000, 10_000), "too_large"),
        "text.png": (b"this is a text file, not an image\n" * 4, "unreadable_image"),
        "zero.png": (b"", "empty_file"),
    }
    for name, (data, reason) in files.items():
        (d / name).write_bytes(data)
        add(f"image {name}", reason, line(name, f"broken {name}"))
    (d / "folder.png").mkdir()
    add("directory named like an image", "unreadable_image", line("folder.png", "a dir"))
    add("missing image", "missing_file", line("missing.png", "nothing here"))

    # --- caption lines that cannot be used
    (d / "spare.png").write_bytes(encode(shape_image(60, HW)))
    add("empty caption", "empty_caption", line("spare.png", "  "))
    add("blank line", "empty_line", b"   ")
    if fmt == "tsv":
        add("bad utf-8", "bad_utf8", b"spare.png\t\xff\xfe caption")
        add("no tab", "malformed_line", b"spare.png a caption without a tab")
        add("empty name", "malformed_line", b"\ta caption without a name")
        add("extra fields", "malformed_caption", b"spare.png\ta caption\t0.93")
        add("whitespace-only fields", "empty_caption", b"spare.png\t \t ")
        # trailing tabs are not a column
        good[caption(k + 2)] = to_float(shape_image(60, HW))
        add("trailing tab", "good", f"spare.png\t{caption(k + 2)}\t".encode())
    else:
        add("bad utf-8", "bad_utf8", b'{"image": "spare.png", "caption": "\xff\xfe"}')
        add("bad json", "malformed_line", b'{"image": "spare.png", "caption": ')
        add("missing caption key", "malformed_line", b'{"image": "spare.png"}')
        add("missing image key", "malformed_line", b'{"caption": "no image key"}')
        add("image not a string", "malformed_line", b'{"image": 3, "caption": "x"}')
        add("json not an object", "malformed_line", b'["spare.png", "x"]')
        # unknown keys are ignored
        good[caption(k + 2)] = to_float(shape_image(60, HW))
        add("extra keys", "good", json.dumps({"image": "spare.png", "caption": caption(k + 2),
                                              "score": 0.9}).encode())
    cap_file = d / ("captions.txt" if fmt == "tsv" else "captions.jsonl")
    cap_file.write_bytes(b"\n".join(lines) + b"\n")
    cfg = {"type": "folder" if fmt == "tsv" else "jsonl", "image_folder": str(d),
           "captions_file": str(cap_file), "img_size": 32, "resize_mode": "fixed",
           "max_length": 16, "shuffle": False}
    return Corpus(cfg, good, skipped, kinds, outside)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def build_webdataset_corpus(root: Path, n_good: int = 6) -> Corpus:
    """Tar shards in ``root/shards`` with JSON captions (``{"caption": ...}``); see the module
    docstring."""
    root = Path(root)
    outside = _outside(root)
    d = root / "shards"
    d.mkdir(parents=True, exist_ok=True)
    good: dict = {}
    kinds: dict = {}
    skipped: dict = {}
    shards: list[list[tuple[str, bytes]]] = [[], []]

    def add(kind: str, reason: str, key: str, members: dict, shard: int = 0) -> None:
        kinds[kind] = reason
        if reason != "good":
            skipped[reason] = skipped.get(reason, 0) + 1
        shards[shard] += [(f"{key}.{ext}", data) for ext, data in members.items()]

    def cap(text: str) -> bytes:
        return json.dumps({"caption": text}).encode()

    for k, (name, data, want) in enumerate(_good_images(n_good)):
        good[caption(k)] = to_float(want)
        add(f"good {name}", "good", f"g{k:03d}", {"png": data, "json": cap(caption(k))}, k % 2)
    k = len(good)
    good[caption(k)] = to_float(shape_image(41, HW))
    add("upper-case extension", "good", "upper", {"PNG": encode(shape_image(41, HW)),
                                                   "json": cap(caption(k))}, 1)
    bad = {
        "unreadable image member": ("unreadable_image", {"png": b"not a png" * 8}),
        "truncated png member": ("truncated_image", {"png": truncated(encode(shape_image(3)))}),
        "corrupt-body jpeg member": ("corrupt_image", {"jpg": corrupt_body_jpeg(4)}),
        "decompression bomb member": ("too_large", {"png": bomb_png(100_000, 100_000)}),
        "tiny image member": ("too_small", {"png": encode(np.zeros((8, 8, 3), np.uint8))}),
        "zero-byte image member": ("empty_file", {"png": b""}),
    }
    for n, (kind, (reason, members)) in enumerate(bad.items()):
        add(kind, reason, f"b{n:03d}", {**members, "json": cap(f"broken {n}")}, n % 2)
    add("member without image", "missing_image", "noimg", {"json": cap("no image"),
                                                            "txt": b"text"})
    add("sample without caption", "missing_caption", "nocap",
        {"png": encode(shape_image(5, HW))}, 1)
    add("caption json without the field", "missing_caption", "nofield",
        {"png": encode(shape_image(6, HW)), "json": b'{"text": "other key"}'})
    add("caption not json", "bad_json", "badjson", {"png": encode(shape_image(7, HW)),
                                                   "json": b"{caption: oops"}, 1)
    add("caption bad utf-8", "bad_utf8", "badutf", {"png": encode(shape_image(8, HW)),
                                                   "json": b'{"caption": "\xff\xfe"}'})
    add("empty caption", "empty_caption", "emptycap", {"png": encode(shape_image(9, HW)),
                                                      "json": cap("   ")}, 1)
    for s, members in enumerate(shards):
        write_tar(d / f"shard-{s}.tar", members)
    # a shard cut in the middle of a member: the samples before the cut are used
    tail_members = []
    for j in range(2):
        c = caption(k + 1 + j)
        tail_members += [(f"t{j:03d}.png", encode(shape_image(50 + j, HW))),
                         (f"t{j:03d}.json", cap(c))]
    write_tar(d / "shard-2.tar", tail_members + [("t999.png", encode(shape_image(52, HW)))])
    with tarfile.open(d / "shard-2.tar") as tar:
        last = tar.getmembers()[-1]
    data = (d / "shard-2.tar").read_bytes()
    (d / "shard-2.tar").write_bytes(data[: last.offset_data + last.size // 2])
    for j in range(2):
        good[caption(k + 1 + j)] = to_float(shape_image(50 + j, HW))
    kinds["truncated tar"] = "shard_error"
    (d / "shard-3.tar").write_bytes(b"this is not a tar archive" * 40)
    kinds["shard that is not a tar"] = "shard_error"
    kinds["missing shard"] = "shard_error"
    skipped["shard_error"] = 3
    urls = [str(d / f"shard-{s}.tar") for s in range(4)] + [str(d / "shard-missing.tar")]
    cfg = {"type": "webdataset", "urls": urls, "caption_key": "json",
           "caption_json_key": "caption", "img_size": 32, "resize_mode": "fixed",
           "max_length": 16, "shuffle": False, "workers": 1}
    return Corpus(cfg, good, skipped, kinds, outside)


# ----------------------------------------------------------------------------- open audit

_WATCHED: list[tuple[str, list]] = []
_HOOK_LOCK = threading.Lock()
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _WATCHED or not args:
        return
    path = args[0]
    if isinstance(path, int):
        return
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return
    for prefix, hits in _WATCHED:
        if p == prefix or p.startswith(prefix + os.sep):
            hits.append(p)


@contextlib.contextmanager
def watch_opens(folder: Path):
    """Collect (in the yielded list) every file under ``folder`` opened by this process, from
    any thread, while the context is active: the audit event ``open`` covers ``open()``,
    ``os.open`` and everything built on them (PIL, tarfile, ...)."""
    global _HOOKED
    with _HOOK_LOCK:
        if not _HOOKED:  # an audit hook cannot be removed: install one, forever, once
            sys.addaudithook(_audit)
            _HOOKED = True
    hits: list = []
    entry = (os.path.realpath(folder), hits)
    _WATCHED.append(entry)
    try:
        yield hits
    finally:
        _WATCHED.remove(entry)
