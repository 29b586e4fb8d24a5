"""From the runs' JSONL rows to the experiment's results: curves, finals over seeds, step time,
steps to a PSNR threshold, stability, and the plots (one figure per measure, variants overlaid).

Pure functions of plain data (rows as the pipeline's MetricsWriter wrote them), so the numbers in
``results.json`` can be recomputed from the run folders without training anything.
"""
from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

EVAL_KEYS = ("eval/psnr", "eval/ssim")
LOSS_KEY = "vae_loss"
SPIKE_RATIO = 2.0  # a step's loss over this multiple of the trailing median counts as a spike
SPIKE_WINDOW = 20
GRAD_KEY = "grad_norm_vae"
# A gradient norm below this from some step to the end: the network stopped learning ("dead":
# e.g. every ReLU on a path off, so no gradient reaches the weights). Healthy runs here: 0.1-10.
DEAD_GRAD = 1e-4
DEAD_MIN_STEPS = 10


def _step(row: Mapping) -> int:
    return int(row.get("extras", {}).get("stage_step", row["global_step"]))


def eval_curve(rows: Sequence[Mapping], key: str) -> tuple[list[int], list[float | None]]:
    """Steps and values of a held-out metric (only rows that carry an evaluation)."""
    pts = [(_step(r), r["metrics"][key]) for r in rows if key in r.get("metrics", {})]
    return [s for s, _ in pts], [v for _, v in pts]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation, min and max over seeds (non-finite values excluded and
    counted: a seed that diverged must not vanish from the table silently)."""
    ok = [float(v) for v in values if _finite(v)]
    out = {"n": len(ok), "n_nonfinite": len(values) - len(ok), "values": list(values)}
    if ok:
        out.update(mean=float(np.mean(ok)), std=float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0,
                   min=min(ok), max=max(ok))
    return out


def steps_to_threshold(steps: Sequence[int], values: Sequence[float | None],
                       threshold: float) -> int | None:
    """First evaluated step whose value reaches ``threshold`` (None: never within the run)."""
    return next((s for s, v in zip(steps, values) if _finite(v) and v >= threshold), None)


def median_step_time(rows: Sequence[Mapping]) -> float | None:
    """Median seconds per training step: every logged step after the first (which compiles),
    except the steps that also evaluated (their wall time includes the evaluation)."""
    ts = [r["extras"]["batch_time"] for r in rows
          if _step(r) > 1 and "batch_time" in r.get("extras", {})
          and not any(k.startswith("eval/") for k in r.get("metrics", {}))]
    return float(np.median(ts)) if ts else None


def loss_curve(rows: Sequence[Mapping]) -> tuple[list[int], list[float | None]]:
    return ([_step(r) for r in rows if LOSS_KEY in r.get("metrics", {})],
            [r["metrics"][LOSS_KEY] for r in rows if LOSS_KEY in r.get("metrics", {})])


def dead_from_step(rows: Sequence[Mapping]) -> int | None:
    """First step from which every later gradient norm is below DEAD_GRAD (at least
    DEAD_MIN_STEPS of them), or None. A run can be finite and spike-free and still have stopped
    learning; this is the check that sees it."""
    pts = [(_step(r), r["metrics"][GRAD_KEY]) for r in rows if GRAD_KEY in r.get("metrics", {})]
    first = None
    for s, g in reversed(pts):
        if not (_finite(g) and g < DEAD_GRAD):
            break
        first = s
    if first is None or pts[-1][0] - first + 1 < DEAD_MIN_STEPS:
        return None
    return first


def stability(rows: Sequence[Mapping], pipeline_state: Mapping) -> dict:
    """Non-finite losses/updates, divergence, and loss spikes (a step's loss above SPIKE_RATIO x
    the median of the SPIKE_WINDOW steps before it; the warm-up window itself is not judged)."""
    _, loss = loss_curve(rows)
    nonfinite_losses = sum(1 for v in loss if not _finite(v))
    spikes, worst = [], 1.0
    for i in range(SPIKE_WINDOW, len(loss)):
        win = [v for v in loss[i - SPIKE_WINDOW:i] if _finite(v)]
        if not win or not _finite(loss[i]):
            continue
        ratio = loss[i] / max(float(np.median(win)), 1e-12)
        worst = max(worst, ratio)
        if ratio > SPIKE_RATIO:
            spikes.append(i + 1)
    result = (pipeline_state.get("results") or {}).get("vae", {})
    stop = pipeline_state.get("last_stop") or {}
    return {"nonfinite_losses": nonfinite_losses,
            "skipped_updates": int(result.get("nonfinite", 0) or 0),
            "diverged": bool(stop.get("diverged")), "loss_spikes": len(spikes),
            "spike_steps": spikes[:20], "max_loss_ratio": float(worst),
            "dead_from_step": dead_from_step(rows)}


def _mean_curve(curves: Sequence[Sequence[float | None]]) -> list[float | None]:
    n = min(len(c) for c in curves)
    out = []
    for i in range(n):
        ok = [c[i] for c in curves if _finite(c[i])]
        out.append(float(np.mean(ok)) if ok else None)
    return out


def summarize_variant(plan: Mapping, run: Mapping, threshold: float) -> dict:
    """Everything the table and plots need about one variant, over its seeds."""
    seeds = run["seeds"]
    curves = {k: {} for k in EVAL_KEYS}
    finals = {k: [] for k in EVAL_KEYS}
    reach, times, stab, walls = [], [], {}, []
    steps_at = []
    for seed, r in seeds.items():
        for k in EVAL_KEYS:
            steps_at, vals = eval_curve(r["rows"], k)
            curves[k][str(seed)] = vals
            finals[k].append(vals[-1] if vals else None)
        s, v = eval_curve(r["rows"], "eval/psnr")
        reach.append(steps_to_threshold(s, v, threshold))
        times.append(median_step_time(r["rows"]))
        stab[str(seed)] = stability(r["rows"], r["pipeline"])
        walls.append(r.get("wall_s"))
    first = next(iter(seeds.values()))["rows"]
    base = {b: next((row["metrics"][f"eval/{b}"] for row in first
                     if f"eval/{b}" in row.get("metrics", {})), None)
            for b in ("psnr_background", "psnr_mean_image")}
    reached = [x for x in reach if x is not None]
    ls, lv = zip(*[loss_curve(r["rows"]) for r in seeds.values()])
    return {
        **dict(plan),
        "eval_steps": steps_at,
        "curves": {k.split("/")[1]: {"per_seed": c, "mean": _mean_curve(list(c.values()))}
                   for k, c in curves.items()},
        "final": {k.split("/")[1]: spread(v) for k, v in finals.items()},
        "steps_to_threshold": {"per_seed": reach, "reached": len(reached),
                               "of": len(reach), **({"mean": float(np.mean(reached))}
                                                    if reached else {})},
        "step_time_s": spread(times),
        "memory": dict(run.get("memory") or {}),
        "stability": stab,
        "wall_s": spread(walls),
        "baselines_db": base,
        "loss_steps": list(ls[0]),
        "loss_mean": _mean_curve([list(v) for v in lv]),
    }


def summarize(plan: Mapping[str, Mapping], runs: Mapping[str, Mapping], *, threshold: float,
              steps: int) -> dict:
    """``{'variants': {name: summary}}`` for every variant that ran."""
    return {"variants": {v: summarize_variant(plan[v], runs[v], threshold) for v in runs},
            "threshold_db": threshold, "steps": steps}


def machine() -> dict:
    """What the numbers were measured on (the load average matters: the cores are shared)."""
    import jax
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "load_average_at_end": list(os.getloadavg())}


def _pm(s: Mapping, fmt: str = "{:.2f}") -> str:
    if "mean" not in s:
        return "-"
    return (fmt + " ± " + fmt).format(s["mean"], s["std"])


def table(results: Mapping) -> str:
    """The README's table (markdown): one row per variant."""
    th = results["threshold_db"]
    head = ("| variant | heads | matching | vae_dim | params | final PSNR dB | final SSIM | "
            f"steps to {th:g} dB | step ms in run | step ms bench | peak step memory MiB | "
            "NaN / spikes | dead seeds |")
    rows = [head, "|" + "---|" * 13]
    for v, s in results["variants"].items():
        st = s["steps_to_threshold"]
        reach = (f"{st['mean']:.0f} ({st['reached']}/{st['of']} seeds)" if st["reached"]
                 else f"not reached (0/{st['of']})")
        t = s["step_time_s"]
        ms = _pm({k: x * 1e3 for k, x in t.items() if k in ("mean", "std")}, "{:.0f}")
        mem = s["memory"].get("peak_bytes")
        bench = s["memory"].get("bench_step_s")
        ms += f" | {bench * 1e3:.0f}" if bench is not None else " | -"
        stab = s["stability"].values()
        nan = sum(x["nonfinite_losses"] + x["skipped_updates"] for x in stab)
        spikes = sum(x["loss_spikes"] for x in s["stability"].values())
        dead = [x["dead_from_step"] for x in s["stability"].values()
                if x.get("dead_from_step") is not None]
        dead_s = (f"{len(dead)}/{len(s['stability'])} (from step {min(dead)}-{max(dead)})"
                  if dead else "0")
        rows.append(f"| {v} | {s.get('head', '-')} | {s['matching']} | {s['vae_dim']} | {s['params']:,} | "
                    f"{_pm(s['final']['psnr'])} | {_pm(s['final']['ssim'], '{:.3f}')} | {reach} | "
                    f"{ms} | {mem / 2**20:.1f} | {nan} / {spikes} | {dead_s} |" if mem is not None else
                    f"| {v} | {s.get('head', '-')} | {s['matching']} | {s['vae_dim']} | {s['params']:,} | "
                    f"{_pm(s['final']['psnr'])} | {_pm(s['final']['ssim'], '{:.3f}')} | {reach} | "
                    f"{ms} | - | {nan} / {spikes} | {dead_s} |")
    return "\n".join(rows)


def plot_all(results: Mapping, out: Path) -> list[Path]:
    """One PNG per measure with the variants overlaid: PSNR, SSIM and loss curves; final PSNR,
    step time, peak memory and parameter count as bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    var = results["variants"]
    written = []

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    for key, label in (("psnr", "held-out PSNR (dB)"), ("ssim", "held-out SSIM")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for v, s in var.items():
            steps = s["eval_steps"]
            per = np.array([[np.nan if x is None else x for x in c[:len(steps)]]
                            for c in s["curves"][key]["per_seed"].values()], float)
            line, = ax.plot(steps, np.nanmean(per, 0), marker="o", ms=3, label=v)
            if per.shape[0] > 1:
                ax.fill_between(steps, np.nanmin(per, 0), np.nanmax(per, 0),
                                color=line.get_color(), alpha=0.15)
        if key == "psnr":
            b = next(iter(var.values()))["baselines_db"]
            for name, ls in (("psnr_background", "--"), ("psnr_mean_image", ":")):
                if b.get(name) is not None:
                    ax.axhline(b[name], color="grey", ls=ls, lw=1, label=name.replace("psnr_", "") + " baseline")
            ax.axhline(results["threshold_db"], color="k", lw=0.6, alpha=0.5, label="threshold")
        ax.set(xlabel="step", ylabel=label, title=f"{label}: mean over seeds, band = min..max")
        ax.legend(fontsize=8)
        save(fig, f"{key}.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v, s in var.items():
        y = np.array([np.nan if x is None else x for x in s["loss_mean"]], float)
        k = max(1, len(y) // 60)
        ys = np.convolve(np.nan_to_num(y, nan=np.nanmax(y)), np.ones(k) / k, mode="valid")
        ax.plot(s["loss_steps"][k - 1:], ys, label=v)
    ax.set(xlabel="step", ylabel="train vae_loss (mean over seeds, smoothed)", yscale="log",
           title="training loss")
    ax.legend(fontsize=8)
    save(fig, "loss.png")
    bars = (("final_psnr.png", "final held-out PSNR (dB)", lambda s: s["final"]["psnr"]),
            ("step_time.png", "step time (ms), in-run median",
             lambda s: {k: x * 1e3 for k, x in s["step_time_s"].items() if k in ("mean", "std")}),
            ("step_time_bench.png", "step time (ms), back-to-back benchmark",
             lambda s: {"mean": s["memory"].get("bench_step_s", np.nan) * 1e3, "std": 0.0}),
            ("memory.png", "compiled step peak memory (MiB)",
             lambda s: {"mean": s["memory"].get("peak_bytes", np.nan) / 2**20, "std": 0.0}),
            ("params.png", "VAE parameters", lambda s: {"mean": s["params"], "std": 0.0}))
    for name, label, get in bars:
        fig, ax = plt.subplots(figsize=(7, 4.0))
        names = list(var)
        vals = [get(var[v]) for v in names]
        ax.bar(names, [x.get("mean", np.nan) for x in vals],
               yerr=[x.get("std", 0.0) for x in vals], capsize=4,
               color=[f"C{i}" for i in range(len(names))])
        ax.set(ylabel=label, title=label + (" (± std over seeds)" if "PSNR" in label
                                            or "in-run" in label else ""))
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        if name == "final_psnr.png":
            lo = min((x.get("min", np.inf) for x in vals), default=0)
            ax.set_ylim(max(0.0, min(lo, results["threshold_db"]) - 2), None)
            ax.axhline(results["threshold_db"], color="k", lw=0.6)
        save(fig, name)
    return written
