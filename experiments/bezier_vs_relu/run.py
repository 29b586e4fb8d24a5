"""Bezier activations against ReLU and SiLU in the same VAE (issue 13): one command.

  python experiments/bezier_vs_relu/run.py --size cpu --seeds 0,1,2 --out runs/bvr

Trains the VAE reconstruction stage (Phase 1's models: VAE + SPADE, no GAN, no LPIPS) once per
variant and seed through ``fluxflow_jax.pipeline.run`` - the same code path as
``python -m fluxflow_jax.main`` - with held-out PSNR/SSIM every ``eval.interval_steps``. Variants
differ only in ``model.activation`` and ``model.vae_dim`` (``variants.py`` says how they are
matched). Then it measures each variant's compiled step (peak memory from XLA's
``memory_analysis``) and writes ``OUT/results.json`` and one PNG per measure (``analysis.py``).

A run already finished under OUT (its ``pipeline_state.json`` lists the stage) is not trained
again, so an interrupted experiment resumes with the same command.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parents[1])]  # sibling modules; configs/ of this checkout

import analysis
import jax
import numpy as np
import variants as V

from fluxflow_jax import data as data_lib
from fluxflow_jax import metrics as metrics_lib
from fluxflow_jax import pipeline, sharding, train, weights, xla
from fluxflow_jax import workdir as wd


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def is_finished(workdir: Path) -> bool:
    return V.STAGE in wd.read_pipeline_state(workdir, [V.STAGE]).get("finished", [])


def train_one(config, workdir: Path) -> dict:
    """Train one (variant, seed) through the pipeline; returns its pipeline state plus wall time.
    A finished run is read back, not retrained."""
    if is_finished(workdir):
        return {**wd.read_pipeline_state(workdir, [V.STAGE]), "resumed": True}
    t0 = time.monotonic()
    state = pipeline.run(config, workdir)
    state["wall_s"] = time.monotonic() - t0
    (workdir / "wall.json").write_text(json.dumps({"wall_s": state["wall_s"]}))
    return state


def step_cost(config, timed_steps: int = 30) -> dict:
    """Memory and time of one compiled VAE train step (the pipeline's own jitted step).

    ``peak_bytes`` = arguments + outputs + temporaries - aliased (donated state): the step's
    device-memory high-water mark as the compiler plans it, independent of the machine's load.
    ``bench_step_s``: median of ``timed_steps`` steps on one batch after compilation - all variants
    are timed back to back at the end, so they share the load of the same few minutes (the in-run
    step times span the whole experiment's changing load). The compilation comes from the
    persistent cache when the training run filled it."""
    st = train.build_stage(config, V.STAGE)
    params, spectral, _ = weights.initial_variables(config, st.models, st.rng, V.STAGE, None,
                                                    st.model_cfg)
    state, txs = train.create_state(st, params, spectral)
    shardings = train.state_shardings(st, state)
    state = jax.device_put(state, shardings)
    fns = train.make_step_fns(st, txs, shardings)
    batch = sharding.put_batch(next(st.loader), st.mesh)
    compiled = fns["vae"].lower(state, batch, st.rng).compile()
    ma = compiled.memory_analysis()
    times = []
    for _ in range(timed_steps + 1):  # the first call warms up
        t0 = time.perf_counter()
        state, m = compiled(state, batch, st.rng)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    close = getattr(st.loader, "close", None)
    if close is not None:
        close()
    parts = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "output", "temp", "alias", "generated_code")}
    parts["peak_bytes"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    parts["bench_step_s"] = float(np.median(times[1:]))
    parts["bench_steps"] = timed_steps
    return parts


def read_rows(workdir: Path) -> list[dict]:
    """The stage's JSONL rows (one per step: log_interval is 1)."""
    path = metrics_lib.metrics_path(workdir, V.STAGE)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(V.SIZES), default="cpu")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--steps", type=int, default=0, help="0: the size's default")
    ap.add_argument("--variants", default=",".join(V.VARIANTS),
                    help=f"comma-separated, from {','.join(V.VARIANTS)}")
    ap.add_argument("--threshold", type=float, default=22.0,
                    help="PSNR (dB) whose first crossing is reported as steps-to-threshold")
    ap.add_argument("--out", default="runs/bezier_vs_relu")
    ap.add_argument("--compilation_cache", default=None,
                    help="persistent XLA cache dir ('none' disables; default as training)")
    ap.add_argument("--plan_only", action="store_true", help="print widths and counts, train nothing")
    ap.add_argument("--analyze_only", action="store_true",
                    help="train nothing: results from the finished runs under --out (unfinished "
                         "ones are listed in results.json as missing)")
    a = ap.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    for v in a.variants:
        V.activation_of(v)  # fails loudly on an unknown name
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    xla.configure_cpu_host()  # as python -m fluxflow_jax.main does, before JAX starts
    xla.enable_compilation_cache(a.compilation_cache)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    the_plan = V.plan(a.size, a.variants)
    print("[bvr] variants:\n" + V.describe(the_plan), flush=True)
    if a.plan_only:
        return 0
    steps = a.steps or V.SIZES[a.size]["steps"]
    runs: dict[str, dict] = {v: {"seeds": {}} for v in the_plan}
    missing: list[str] = []
    # Seeds outer: an experiment cut short still compares every variant on the same seeds.
    for seed in a.seeds:
        for v, p in the_plan.items():
            cfg = V.make_config(a.size, p["activation"], p["vae_dim"], seed, steps,
                                  head=V.head_of(v))
            w = run_dir(out, v, seed)
            if a.analyze_only and not is_finished(w):
                missing.append(f"{v}/seed{seed}")
                continue
            print(f"[bvr] {v} seed {seed} -> {w}", flush=True)
            ps = train_one(cfg, w)
            wall = json.loads((w / "wall.json").read_text())["wall_s"] if (
                w / "wall.json").exists() else None
            runs[v]["seeds"][seed] = {"rows": read_rows(w), "pipeline": ps, "wall_s": wall}
    runs = {v: r for v, r in runs.items() if r["seeds"]}
    for v, p in the_plan.items():
        if v not in runs:
            continue
        cfg = V.make_config(a.size, p["activation"], p["vae_dim"], a.seeds[0], steps,
                              head=V.head_of(v))
        runs[v]["memory"] = step_cost(cfg, 30 if a.size != "tiny" else 3)
    results = analysis.summarize(the_plan, runs, threshold=a.threshold, steps=steps)
    results["setup"] = {
        "size": a.size, "steps": steps, "seeds": a.seeds, "threshold_db": a.threshold,
        "command": "python experiments/bezier_vs_relu/run.py " + " ".join(argv or sys.argv[1:]),
        "size_settings": V.SIZES[a.size], "machine": analysis.machine(),
        "missing_runs": missing,
        "dataset": json.loads(data_lib.redacted_json(V.make_config(a.size, "bezier", 8, 0, 1).datasets)),
        "stage": V.make_config(a.size, "bezier", 8, 0, steps).stages[V.STAGE].to_dict(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    pngs = analysis.plot_all(results, out)
    print(analysis.table(results), flush=True)
    print(f"[bvr] wrote {out / 'results.json'} and {len(pngs)} plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
