"""How long a stage over several aspect buckets waits for compiles, with ``compile_ahead`` off and
on: one stage of a shipped config through ``pipeline.run``, as the entry point runs it.

    python benchmarks/compile_ahead.py                         # demo VAE stage, 4 buckets at 64 px
    python benchmarks/compile_ahead.py --stage vae_gan --config configs/demo.py:test \\
        --threads 0,1,2 --steps 24

Why: each batch shape compiles the stage's steps anew (``fluxflow_jax/compile_ahead.py``). With
``compile_ahead`` off a run stops for each new shape when it first arrives; on, the shapes the
plan brings are compiled in background threads once the first has compiled. Each row is a fresh
process with the persistent compilation cache off (``FLUXFLOW_JAX_CACHE=none``: every row
compiles everything), on a folder whose images fall evenly into ``--buckets``. ``wall``: the
stage's ``pipeline.run`` time; ``compile``: seconds compiling, summed over shapes (in background
threads too); ``waited``: seconds the loop stopped for compiles (the first shape's included);
``RSS``: the process's peak resident memory (Linux ``ru_maxrss``).
Prints a table; writes ``benchmarks/results/compile_ahead.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> dict:
    """One stage in this process; what its JSONL's last row and the clock say."""
    import ml_collections as mlc
    from PIL import Image

    from fluxflow_jax import config_defaults as cd
    from fluxflow_jax import pipeline
    from fluxflow_jax.data import shapes, write_shapes_folder

    tmp = Path(tempfile.mkdtemp(prefix="compile_ahead_"))
    buckets = [[int(x) for x in b.split("x")] for b in args.buckets.split(",")]
    per = args.per_bucket
    data = write_shapes_folder(tmp / "f", per * len(buckets), img_size=32)
    for i in range(per * len(buckets)):
        hw = tuple(buckets[i // per])
        Image.fromarray(shapes.render(shapes.scene(i), hw)).save(tmp / "f" / f"{i:06d}.png")
    c = cd.load_config_file(args.config, ROOT)
    c.datasets = mlc.ConfigDict({"shapes": cd.dataset_config(
        **data, img_size=max(max(b) for b in buckets), resize_mode="bucket", buckets=buckets)})
    c.default_dataset = "shapes"
    c.stage_order = (args.stage,)
    stage = c.stages[args.stage]
    stage.dataset, stage.steps, stage.epochs, stage.stop_metric = "", args.steps, 0, ""
    c.batch_size = args.batch
    c.log_interval = 1
    c.samples.enabled = False
    c.eval.interval_steps = 0
    c.compile_ahead = args.threads
    t0 = time.monotonic()
    pipeline.run(mlc.ConfigDict(c), tmp / "w")
    wall = time.monotonic() - t0
    rows = (tmp / "w" / "graph" / f"training_metrics_{args.stage}.jsonl").read_text().splitlines()
    ex = json.loads(rows[-1])["extras"]
    return {"threads": args.threads, "wall_s": round(wall, 1), "steps": len(rows),
            "batch_shapes": ex["batch_shapes"], "compile_s": ex["compile_s"],
            "compile_wait_s": ex["compile_wait_s"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--stage", default="vae_warmup")
    p.add_argument("--buckets", default="64x64,48x80,80x48,48x96")
    p.add_argument("--per_bucket", type=int, default=4, help="images per bucket")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", default="0,1,2", help="compile_ahead values, one row each")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compile_ahead.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.threads = int(args.threads)
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    env = {**os.environ, "FLUXFLOW_JAX_CACHE": "none"}
    for n in [int(x) for x in args.threads.split(",")]:
        cmd = [sys.executable, __file__, "--child", "--threads", str(n)] + [
            f"--{k}={getattr(args, k)}" for k in ("config", "stage", "buckets", "per_bucket",
                                                   "batch", "steps")]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"compile_ahead={n} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
        r = rows[-1]
        print(f"compile_ahead={n}: wall {r['wall_s']} s, {r['batch_shapes']} shapes, compile "
              f"{r['compile_s']} s, waited {r['compile_wait_s']} s, peak RSS {r['peak_rss_mb']} MB",
              flush=True)
    print(f"\n{'compile_ahead':>13} {'wall s':>7} {'shapes':>6} {'compile s':>9} {'waited s':>8} "
          f"{'RSS MB':>7}")
    for r in rows:
        print(f"{r['threads']:>13} {r['wall_s']:>7} {r['batch_shapes']:>6} {r['compile_s']:>9} "
              f"{r['compile_wait_s']:>8} {r['peak_rss_mb']:>7}")
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
