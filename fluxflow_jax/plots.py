"""Plots and a text summary of a stage's metrics JSONL (the reference's file names, 150 dpi).

``make_plots(workdir, stage)`` writes into ``W/graph/``: ``<stage>_training_losses.png``,
``<stage>_kl_loss.png``, ``<stage>_learning_rates.png``, ``<stage>_batch_times.png``,
``<stage>_training_overview.png`` and ``<stage>_training_summary.txt``. Matplotlib's object API
(no pyplot), so it is safe from a background thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

import numpy as np

from fluxflow_jax.metrics import format_duration, metrics_path, read_jsonl  # noqa: F401

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------


def _base(name: str) -> str:
    return name.rsplit("/", 1)[-1].lower()


def _series(entries: list[dict], group: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(global_step, value) pairs of one key, skipping nulls and non-numbers."""
    xs, ys = [], []
    for e in entries:
        v = (e.get(group) or {}).get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        step = e.get("global_step")
        if not isinstance(step, (int, float)):
            continue
        xs.append(step)
        ys.append(float(v))
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def _keys(entries: list[dict], group: str) -> list[str]:
    seen: dict[str, None] = {}
    for e in entries:
        for k in e.get(group) or {}:
            seen.setdefault(k, None)
    return list(seen)


def _is_kl(name: str) -> bool:
    b = _base(name)
    return "kl" in b and "beta" not in b


def _is_beta(name: str) -> bool:
    b = _base(name)
    return "beta" in b


def _is_lr(name: str) -> bool:
    b = _base(name)
    return (
        name.lower().startswith("learning/")
        or b in ("lr", "learning_rate")
        or b.startswith("lr_")
        or b.endswith("_lr")
    )


def _is_time(name: str) -> bool:
    return _base(name) in ("batch_time", "step_time", "time_per_step")


class _Groups:
    """Which series go into which plot, for any metric naming ('train/loss_recon' or 'vae_loss')."""

    def __init__(self, entries: list[dict]):
        self.entries = entries
        mkeys = _keys(entries, "metrics")
        self.losses = [("metrics", k) for k in mkeys if "loss" in _base(k) and not _is_kl(k)]
        self.kl = [("metrics", k) for k in mkeys if _is_kl(k)]
        self.beta = [("metrics", k) for k in mkeys if _is_beta(k)]
        self.lrs = [("learning_rates", k) for k in _keys(entries, "learning_rates")]
        self.lrs += [("metrics", k) for k in mkeys if _is_lr(k)]
        times = [("extras", k) for k in _keys(entries, "extras") if _is_time(k)]
        self.times = times + [("metrics", k) for k in mkeys if _is_time(k)]

    def nonempty(self, series: list[tuple[str, str]]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        out = []
        for group, key in series:
            x, y = _series(self.entries, group, key)
            if x.size:
                out.append((key, x, y))
        return out


def _set_log_y(ax, ys: Iterable[np.ndarray]) -> None:
    """Log y when every value is positive; symlog otherwise (hinge/GAN losses can be negative)."""
    allv = np.concatenate([np.asarray(y) for y in ys]) if ys else np.zeros(0)
    if allv.size and np.all(allv > 0):
        ax.set_yscale("log")
    elif allv.size:
        ax.set_yscale(
            "symlog", linthresh=max(1e-6, float(np.min(np.abs(allv[allv != 0]), initial=1.0)))
        )


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")


def _plot_lines(ax, series, *, log_y: bool, title: str, ylabel: str) -> None:
    for name, x, y in series:
        ax.plot(x, y, label=name, linewidth=1.2, alpha=0.85)
    if log_y:
        _set_log_y(ax, [y for _, _, y in series])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _plot_times(ax, series) -> None:
    for name, x, y in series:
        ax.plot(x, y, label=f"{name} (raw)", linewidth=0.8, alpha=0.4)
        n = y.size
        if n > 10:
            w = max(1, min(50, n // 5))
            ax.plot(
                x[w - 1 :], _moving_average(y, w), label=f"{name} (moving avg, {w})", linewidth=2
            )
    ax.set_title("Batch times")
    ax.set_ylabel("seconds")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _summary_text(entries: list[dict], stage: str, groups: _Groups) -> str:
    lines = [f"Training summary - stage '{stage}'" if stage else "Training summary", "=" * 60]
    sessions = sorted({str(e.get("session_id")) for e in entries if e.get("session_id")})
    lines.append(f"Session: {', '.join(sessions) if sessions else '?'}")
    stamps = []
    for e in entries:
        try:
            stamps.append(datetime.fromisoformat(str(e.get("timestamp"))))
        except ValueError:
            pass
    if stamps:
        t0, t1 = min(stamps), max(stamps)
        span = (t1 - t0).total_seconds()
        lines.append(f"Time span: {t0.isoformat()} -> {t1.isoformat()} ({format_duration(span)})")
    steps = [
        e.get("global_step") for e in entries if isinstance(e.get("global_step"), (int, float))
    ]
    if steps:
        lines.append(f"Global steps: {min(steps)} -> {max(steps)} ({len(entries)} log entries)")
    lines.append("")
    header = f"{'metric':<36}{'initial':>12}{'final':>12}{'min':>12}{'max':>12}{'mean':>12}{'std':>12}{'change':>10}"
    for group in ("metrics", "learning_rates", "extras"):
        keys = _keys(entries, group)
        rows = []
        for k in keys:
            _, y = _series(entries, group, k)
            if not y.size:
                continue
            change = f"{100.0 * (y[-1] - y[0]) / abs(y[0]):+.1f}%" if y[0] != 0 else "n/a"
            rows.append(
                f"{k[:35]:<36}{y[0]:>12.4g}{y[-1]:>12.4g}{y.min():>12.4g}{y.max():>12.4g}"
                f"{y.mean():>12.4g}{y.std():>12.4g}{change:>10}"
            )
        if rows:
            lines += [f"[{group}]", header, *rows, ""]
    lrs = groups.nonempty(groups.lrs)
    if lrs:
        lines.append("Learning rates (initial -> final):")
        lines += [f"  {name}: {y[0]:.3e} -> {y[-1]:.3e}" for name, _, y in lrs]
    return "\n".join(lines) + "\n"


def make_plots(workdir: str | Path, stage: str) -> list[Path]:
    """Write the stage's plots and summary into ``W/graph/``; returns the files written.

    Plots whose data is absent are skipped (a flow stage has no KL plot); no data at all -> ``[]``.
    """
    entries = read_jsonl(metrics_path(workdir, stage))
    if not entries:
        return []
    # Figures built directly (no pyplot): no global backend switch, safe from a background thread.
    from matplotlib.figure import Figure

    out_dir = Path(workdir) / "graph"
    prefix = f"{stage}_" if stage else ""
    groups = _Groups(entries)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / f"{prefix}{name}"
        fig.tight_layout()
        fig.savefig(path, dpi=150, bbox_inches="tight")
        written.append(path)

    losses = groups.nonempty(groups.losses)
    kl = groups.nonempty(groups.kl)
    beta = groups.nonempty(groups.beta)
    lrs = groups.nonempty(groups.lrs)
    times = groups.nonempty(groups.times)

    if losses:
        fig = Figure(figsize=(12, 6))
        ax = fig.subplots()
        _plot_lines(ax, losses, log_y=True, title="Training losses", ylabel="loss")
        ax.set_xlabel("global step")
        save(fig, "training_losses.png")

    if kl:
        fig = Figure(figsize=(12, 6))
        ax = fig.subplots()
        _plot_lines(ax, kl, log_y=True, title="KL divergence and beta", ylabel="KL")
        if beta:
            ax2 = ax.twinx()
            for name, x, y in beta:
                ax2.plot(x, y, "--", color="tab:green", label=name, linewidth=1.5)
            ax2.set_ylabel("beta")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="best", fontsize=8)
        ax.set_xlabel("global step")
        save(fig, "kl_loss.png")

    if lrs:
        fig = Figure(figsize=(12, 6))
        ax = fig.subplots()
        _plot_lines(ax, lrs, log_y=True, title="Learning rates", ylabel="learning rate")
        ax.set_xlabel("global step")
        save(fig, "learning_rates.png")

    if times:
        fig = Figure(figsize=(12, 6))
        ax = fig.subplots()
        _plot_times(ax, times)
        ax.set_xlabel("global step")
        save(fig, "batch_times.png")

    panels = [p for p in (("losses", losses), ("kl", kl), ("lrs", lrs), ("times", times)) if p[1]]
    if panels:
        fig = Figure(figsize=(12, 3.5 * len(panels)))
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)
        for ax, (kind, series) in zip(axes[:, 0], panels):
            if kind == "losses":
                _plot_lines(ax, series, log_y=True, title="Losses", ylabel="loss")
            elif kind == "kl":
                _plot_lines(ax, series, log_y=True, title="KL", ylabel="KL")
            elif kind == "lrs":
                _plot_lines(ax, series, log_y=True, title="Learning rates", ylabel="lr")
            else:
                _plot_times(ax, series)
        axes[-1, 0].set_xlabel("global step")
        save(fig, "training_overview.png")

    summary = out_dir / f"{prefix}training_summary.txt"
    summary.write_text(_summary_text(entries, stage, groups), encoding="utf-8")
    written.append(summary)
    return written
