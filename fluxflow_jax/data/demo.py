"""The embedded demo data and writers that turn the shapes generator into every on-disk format.

Shipped under ``demo_assets/`` (package data, < 100 kB): the demo tokenizer and one real photograph
(public domain, see ``demo_assets/photos/LICENSE.txt``). Everything else is generated: the shapes
source needs no files at all, and ``write_shapes_folder`` / ``write_shapes_shards`` write the same
samples as a folder + captions file, a JSONL file or WebDataset tar shards, so every source type can
be exercised (tests, benchmarks, the demo config) offline and on known ground truth.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from fluxflow_jax.data import shapes

DEMO_ASSETS = Path(__file__).parent / "demo_assets"


def demo_shapes_config(img_size: int = 64, num_samples: int = 10000, **overrides: Any) -> dict:
    """Dataset config of the procedural shapes source (fixed size, no files)."""
    return {"type": "shapes", "img_size": img_size, "num_samples": num_samples,
            "resize_mode": "fixed", **overrides}


def demo_photos_config(**overrides: Any) -> dict:
    """Dataset config of the shipped photograph(s) (a folder + captions file)."""
    return {"type": "folder", "image_folder": str(DEMO_ASSETS / "photos"),
            "captions_file": str(DEMO_ASSETS / "photos" / "captions.txt"), **overrides}


def _encode(arr, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG" if fmt in ("jpg", "jpeg") else fmt.upper(),
                              **({"quality": 92} if fmt in ("jpg", "jpeg") else {}))
    return buf.getvalue()


def write_shapes_folder(out_dir: str | os.PathLike, num_samples: int, img_size: int = 32,
                        seed: int = 0, fmt: str = "png", captions: str = "tsv") -> dict:
    """Write ``num_samples`` shapes images and a captions file (``tsv``: ``name<TAB>caption``,
    ``jsonl``: ``{"image", "caption"}``); returns the matching dataset config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(num_samples):
        arr, cap, _ = shapes.sample(i, seed, img_size)
        name = f"{i:06d}.{fmt}"
        (out / name).write_bytes(_encode(arr, fmt))
        lines.append(f"{name}\t{cap}" if captions == "tsv"
                     else json.dumps({"image": name, "caption": cap}))
    cap_file = out / ("captions.txt" if captions == "tsv" else "captions.jsonl")
    cap_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"type": "folder" if captions == "tsv" else "jsonl", "image_folder": str(out),
            "captions_file": str(cap_file)}


def write_shapes_shards(out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int,
                        img_size: int = 32, seed: int = 0, fmt: str = "png",
                        caption_member: str = "txt") -> dict:
    """Write shapes samples as WebDataset tar shards ``shard-000000.tar``...; the caption goes in
    a ``.txt`` member or, with ``caption_member='json'``, in ``{"prompt": ...}``. Returns the
    matching dataset config (brace-expanded url pattern)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (num_samples + samples_per_shard - 1) // samples_per_shard
    for s in range(n_shards):
        with tarfile.open(out / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(s * samples_per_shard, min(num_samples, (s + 1) * samples_per_shard)):
                arr, cap, _ = shapes.sample(i, seed, img_size)
                members = {fmt: _encode(arr, fmt)}
                if caption_member == "json":
                    members["json"] = json.dumps({"prompt": cap}).encode()
                else:
                    members["txt"] = cap.encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    cfg = {"type": "webdataset",
           "urls": str(out / f"shard-{{000000..{n_shards - 1:06d}}}.tar")}
    if caption_member == "json":
        cfg.update(caption_key="json", caption_json_key="prompt")
    return cfg
