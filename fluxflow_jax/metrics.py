"""Training metrics: the reference's JSONL + session files, TensorBoard scalars, a console progress line.

Files under the run's workdir ``W`` (stage ``s``; an empty stage gives the reference's legacy names):

* ``W/graph/training_metrics_<s>.jsonl`` - one JSON object per logged step, in the reference's line
  format ``{"timestamp", "session_id", "epoch", "batch", "global_step", "metrics": {...},
  ["learning_rates": {...}], ["extras": {...}]}`` (the two optional keys are left out when empty, as
  the reference does); NaN/Inf become ``null`` and the line is written with ``allow_nan=False``, so
  every line is strict JSON.
* ``W/graph/session_<s>.json`` - ``{session_id, created_at, resumed_count, last_update}``; re-opening a
  stage's writer counts a resume (the reference has the counter but never increments it).
* ``W/tb/<s>/events.out.tfevents.*`` - TensorBoard scalars through tensorboardX (no TensorFlow).

Plots of a stage's JSONL: ``fluxflow_jax.plots.make_plots``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# values
# ----------------------------------------------------------------------------------------------------


def to_python(value: Any, *, name: str = "value") -> Any:
    """A metric value as a JSON-able Python scalar: jax/numpy scalars -> float/int, NaN/Inf -> None.

    Calling this on a device array blocks until it is computed; the loop should call it only on the
    steps it logs.
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    arr = np.asarray(value)
    if arr.size != 1:
        raise TypeError(f"metric '{name}' must be a scalar, got an array of shape {arr.shape}")
    item = arr.reshape(()).item()
    return to_python(item, name=name)


def sanitize(values: Mapping[str, Any] | None, group: str) -> dict:
    """A dict of metric values converted by ``to_python`` (errors name ``group/key``)."""
    return {str(k): to_python(v, name=f"{group}/{k}") for k, v in (values or {}).items()}


def _stage_suffix(stage: str | None) -> str:
    return f"_{stage}" if stage else ""


def metrics_path(workdir: str | Path, stage: str | None) -> Path:
    return Path(workdir) / "graph" / f"training_metrics{_stage_suffix(stage)}.jsonl"


def session_path(workdir: str | Path, stage: str | None) -> Path:
    return Path(workdir) / "graph" / f"session{_stage_suffix(stage)}.json"


def read_jsonl(path: str | Path) -> list[dict]:
    """All valid JSON object lines of ``path`` (a torn last line from a crash is skipped, not fatal)."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a line that is not valid JSON", path, lineno)
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


# ----------------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------------


def drop_after(path: Path, global_step: int) -> int:
    """Remove the lines past ``global_step`` from a JSONL (a run killed after its last checkpoint
    logged steps it will log again on resume); returns how many were dropped. Atomic rewrite."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            past = int(json.loads(line).get("global_step", 0)) > global_step
        except (ValueError, AttributeError):
            past = False  # a line the reader skips anyway; keep it as it was
        if past:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        tmp.replace(path)
    return dropped


def _now() -> str:
    return datetime.now().isoformat()


def _open_session(path: Path) -> dict:
    """Create the session file, or count one more resume in an existing one."""
    session = None
    if path.exists():
        try:
            session = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError) as e:
            log.warning("session file %s unreadable (%s); starting a new session", path, e)
    if isinstance(session, dict) and session.get("session_id"):
        session["resumed_count"] = int(session.get("resumed_count", 0)) + 1
        session["last_update"] = _now()
    else:
        session = {
            "session_id": datetime.now().strftime("%Y%m%d_%H%M%S"),
            "created_at": _now(),
            "resumed_count": 0,
            "last_update": _now(),
        }
    _write_json_atomic(path, session)
    return session


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2), encoding="utf-8")
    tmp.replace(path)


def _tag(group: str, key: str) -> str:
    """TensorBoard tag: namespaced names ('train/loss') stay, plain ones go under their group."""
    return key if "/" in key else f"{group}/{key}"


class MetricsWriter:
    """Appends metric lines for one stage to JSONL (+ session file) and TensorBoard.

    Only process 0 writes on multi-host runs (``active`` defaults to ``jax.process_index() == 0``);
    on the other processes every method is a no-op.
    """

    def __init__(
        self,
        workdir: str | Path,
        stage: str,
        *,
        tensorboard: bool = True,
        active: bool | None = None,
        resume_at: int | None = None,
    ):
        if active is None:
            import jax

            active = jax.process_index() == 0
        self.active = bool(active)
        self.workdir = Path(workdir)
        self.stage = stage
        self.path = metrics_path(workdir, stage)
        self.session_file = session_path(workdir, stage)
        self.session: dict = {}
        self._file: TextIO | None = None
        self._tb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.session = _open_session(self.session_file)
        if resume_at is not None:
            drop_after(self.path, resume_at)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = self.workdir / "tb" / (stage or "default")
            # purge_step: TensorBoard drops the events a killed run logged past its checkpoint
            purge = None if resume_at is None else int(resume_at) + 1
            self._tb = SummaryWriter(logdir=str(tb_dir), flush_secs=30, purge_step=purge)

    @property
    def session_id(self) -> str | None:
        return self.session.get("session_id")

    @property
    def tb_dir(self) -> Path:
        return self.workdir / "tb" / (self.stage or "default")

    def write(
        self,
        step: int,
        epoch: int,
        batch: int,
        metrics: Mapping[str, Any],
        learning_rates: Mapping[str, Any] | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> dict:
        """Append one line (and the TensorBoard scalars); returns the dict that was written."""
        entry = {
            "timestamp": _now(),
            "session_id": self.session_id,
            "epoch": int(epoch),
            "batch": int(batch),
            "global_step": int(step),
            "metrics": sanitize(metrics, "metrics"),
        }
        lrs = sanitize(learning_rates, "learning_rates")
        ext = sanitize(extras, "extras")
        if lrs:
            entry["learning_rates"] = lrs
        if ext:
            entry["extras"] = ext
        if not self.active:
            return entry
        line = json.dumps(entry, allow_nan=False)
        try:
            self._file.write(line + "\n")
            self._file.flush()  # the reference's default "immediate" policy: a crash loses no line
        except OSError as e:
            log.error("could not write metrics to %s: %s", self.path, e)
            print(f"FALLBACK_METRIC: {line}", file=sys.stderr)
        if self._tb is not None:
            for group, values in (
                ("metrics", metrics),
                ("learning_rates", learning_rates),
                ("extras", extras),
            ):
                for k, v in (values or {}).items():
                    if isinstance(v, str) or v is None:
                        continue
                    # TensorBoard gets the raw float: a NaN should show up there as a NaN
                    self._tb.add_scalar(
                        _tag(group, str(k)), float(np.asarray(v)), global_step=int(step)
                    )
        return entry

    def images(self, step: int, paths: list[Path]) -> None:
        """Sample grids (PNG files) into TensorBoard's Images tab, tagged by kind (``samples/
        recon``, ``samples/gen``), so a run's pictures sit beside its curves at the same step."""
        if self._tb is None:
            return
        for path in paths:
            kind = "gen" if "_gen_" in Path(path).name else "recon"
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            self._tb.add_image(f"samples/{kind}", arr, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self.active and self.session:
            self.session["last_update"] = _now()
            _write_json_atomic(self.session_file, self.session)

    def close(self) -> None:
        if not self.active:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
# console
# ----------------------------------------------------------------------------------------------------


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (hours unbounded); ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(max(0.0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _fmt_value(v: Any) -> str:
    try:
        f = float(np.asarray(v))
    except (TypeError, ValueError):
        return str(v)
    if f != 0.0 and (abs(f) < 1e-3 or abs(f) >= 1e4):
        return f"{f:.3e}"
    return f"{f:.4f}"


class ProgressBar:
    """One console progress line: count, rate (steps/s), ETA and the latest metrics.

    On a TTY the line is redrawn in place (at most every ``refresh_s``); otherwise (log files, Colab
    cell capture, batch jobs) a full line is printed every ``log_every_s`` seconds and at ``close``.
    Metric values are kept as given and converted only when a line is rendered, so passing device
    arrays every step does not force a host sync every step.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        initial: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        refresh_s: float = 0.2,
        log_every_s: float = 30.0,
        clock=time.monotonic,
        active: bool = True,
    ):
        self.total = total
        self.desc = desc
        self.n = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.refresh_s = refresh_s
        self.log_every_s = log_every_s
        self._clock = clock
        self._start = clock()
        self._steady: tuple[float, int] | None = None  # (time, n) after the first update
        self._last_render = -math.inf
        self._metrics: dict = {}
        self._closed = False
        self.active = active  # multi-host: only process 0 prints

    @property
    def rate(self) -> float | None:
        """Steady-state steps per second: counted from the end of the first update after start, so
        the first step's XLA compilation (seconds to minutes) does not inflate the ETA."""
        if self._steady is None:
            return None
        t0, n0 = self._steady
        elapsed = self._clock() - t0
        done = self.n - n0
        return done / elapsed if elapsed > 0 and done > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.rate
        if self.total is None or rate is None:
            return None
        return max(0, self.total - self.n) / rate

    def render(self) -> str:
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.n}/{self.total} ({100.0 * self.n / self.total:.1f}%)")
        else:
            parts.append(f"{self.n}")
        rate = self.rate
        parts.append(f"{rate:.2f} steps/s" if rate is not None else "? steps/s")
        parts.append(f"elapsed {format_duration(self._clock() - self._start)}")
        if self.total:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        line = " | ".join(parts)
        if self._metrics:
            line += " | " + " ".join(f"{k}: {_fmt_value(v)}" for k, v in self._metrics.items())
        return line

    def update(self, n: int = 1, **metrics: Any) -> None:
        """Advance by ``n`` steps and remember ``metrics`` for display."""
        self.n += int(n)
        if metrics:
            self._metrics.update(metrics)
        now = self._clock()
        if self._steady is None:
            self._steady = (now, self.n)
        interval = self.refresh_s if self.tty else self.log_every_s
        finished = self.total is not None and self.n >= self.total
        if now - self._last_render >= interval or finished:
            self._emit()
            self._last_render = now

    def write(self, message: str) -> None:
        """Print a message on its own line without breaking the progress line."""
        if not self.active:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(message + "\n")
        if self.tty:
            self._emit()
        self.stream.flush()

    def _emit(self) -> None:
        if not self.active:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.render())
        else:
            self.stream.write(self.render() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._emit()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Our namespaced metric names -> the reference's JSONL names (REFERENCE.md §7).
REFERENCE_NAMES = {
    "train/loss_recon": "vae_loss", "train/kl": "kl_loss", "train/kl_beta": "kl_beta",
    "train/loss_g": "generator_loss", "train/loss_d": "discriminator_loss",
    "train/lpips": "lpips_loss", "train/loss_flow": "flow_loss",
    "train/color_stats": "color_stats", "train/hist": "hist_loss",
    "train/contrast": "contrast_loss",
}


def reference_metric_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics keyed by both our names and the reference's JSONL names."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("learning/"):
            continue
        out[REFERENCE_NAMES.get(k, k.split("/", 1)[-1])] = v
    return out
