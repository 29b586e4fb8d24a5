"""Loader throughput: images/s with 2 decode workers, and whether it keeps up with a step rate.

    python benchmarks/data_throughput.py [--batch 16] [--batches 40] [--step_ms 0,20]

Datasets (all generated offline in a temp dir, so the numbers are reproducible):
  shapes-64      procedural shapes rendered at 64x64 (the demo source, no files; rendered
                 images are memoised, so this is the rate from the second epoch on)
  shapes-64-uncached  the same with every image rendered (the first epoch)
  folder-png-64  64x64 PNG files + captions.txt, fixed 64x64 (the demo's folder form)
  folder-jpg-256 256x256 JPEG files resized/cropped to 128x128 (a realistic photo folder)
  wds-png-64     the 64x64 PNGs as WebDataset tar shards
Each is measured with workers=2 (and workers=0 for the map-style ones, as a baseline).
``--step_ms`` lists simulated training-step times (the main thread sleeps that long between
batches, as it waits on an accelerator): 0 measures raw throughput; otherwise the interesting
number is the stall, the time ``next()`` still blocked per step.
Writes benchmarks/results/data_throughput.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fluxflow_jax.data import load_tokenizer, make_loader, shapes, write_shapes_folder
from fluxflow_jax.data.demo import write_shapes_shards


def _jpeg_folder(root: Path, n: int, size: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        arr = shapes.render(shapes.scene(i), size)
        noise = np.random.default_rng(i).integers(0, 20, arr.shape, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr + noise).save(buf, format="JPEG", quality=90)
        (root / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        lines.append(f"{i:06d}.jpg\t{shapes.scene(i).caption}")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return {"type": "folder", "image_folder": str(root),
            "captions_file": str(root / "captions.txt")}


def measure(cfg: dict, tokenizer, batch: int, batches: int, step_ms: float) -> dict:
    loader = make_loader(cfg, global_batch_size=batch, seed=0, tokenizer=tokenizer,
                         process_index=0, process_count=1)
    t0 = time.perf_counter()
    next(loader)
    first = time.perf_counter() - t0
    for _ in range(2):
        next(loader)
    waited = 0.0
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t
        if step_ms:
            time.sleep(step_ms / 1000.0)
    wall = time.perf_counter() - t0
    loader.close()
    return {"images_per_s": batches * batch / (waited if not step_ms else wall),
            "batches_per_s": batches / (waited if not step_ms else wall),
            "first_batch_s": first, "stall_ms_per_step": 1000.0 * waited / batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--step_ms", default="0,20", help="comma-separated step times (ms)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                         "data_throughput.json"))
    args = ap.parse_args()
    tok = load_tokenizer()
    n = args.batch * 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        png = write_shapes_folder(tmp / "png", n, img_size=64)
        jpg = _jpeg_folder(tmp / "jpg", n, 256)
        wds = write_shapes_shards(tmp / "wds", n, max(1, n // 8), img_size=64)
        common = {"resize_mode": "fixed", "max_length": 32}
        cases = [
            ("shapes-64", {"type": "shapes", "img_size": 64, "num_samples": n, **common}),
            # too many samples to memoise: every image is rendered (the first epoch's cost)
            ("shapes-64-uncached", {"type": "shapes", "img_size": 64, "num_samples": 100_000,
                                    **common}),
            ("folder-png-64", {**png, "img_size": 64, **common}),
            ("folder-jpg-256->128", {**jpg, "img_size": 128, "crop": "random", "flip": True,
                                     **common}),
            ("wds-png-64", {**wds, "img_size": 64, "shuffle_buffer": 64, **common}),
        ]
        rows = []
        for step_ms in [float(x) for x in args.step_ms.split(",")]:
            print(f"-- simulated step {step_ms:g} ms, batch {args.batch}")
            for name, cfg in cases:
                for workers in ((2, 0) if cfg["type"] != "webdataset" else (2, 1)):
                    r = measure({**cfg, "workers": workers}, tok, args.batch, args.batches,
                                step_ms)
                    rows.append({"dataset": name, "workers": workers, "step_ms": step_ms, **r})
                    print(f"{name:20s} workers={workers}  {r['images_per_s']:7.0f} img/s  "
                          f"{r['batches_per_s']:6.1f} batch/s  first batch "
                          f"{r['first_batch_s']:.2f}s  stall {r['stall_ms_per_step']:5.1f} "
                          "ms/step", flush=True)
    result = {"batch": args.batch, "batches": args.batches,
              "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
