"""How a running stage is told to stop: signals, control files in the workdir, its stop condition.

``W/.pause`` blocks the loop until removed, ``W/.checkpoint`` asks for a checkpoint (and samples)
now, ``W/.stop`` saves and stops; SIGTERM/SIGINT save a checkpoint at the current step and stop,
so preemptible machines lose nothing. A stage's ``stop_metric`` ends it early when the mean of the
last ``stop_window`` logged values is below/above ``stop_threshold``.
"""
from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopControls:
    """SIGTERM/SIGINT and ``W/.pause``, ``W/.checkpoint``, ``W/.stop`` files."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: the user means it - stop now
            print(f"\n[train] second {signal.Signals(signum).name}: exiting without saving",
                  flush=True)
            os._exit(128 + signum)
        self.signal = signum
        print(f"\n[train] received {signal.Signals(signum).name}: saving a checkpoint at the "
              "current step and exiting (send it again to exit at once)", flush=True)

    def _take(self, name: str) -> bool:
        p = self.workdir / name
        if p.exists():
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            return True
        return False

    def poll(self) -> dict:
        """Which actions are requested now (pause blocks here until .pause is removed)."""
        paused = False
        while (self.workdir / ".pause").exists() and self.signal is None:
            if not paused:
                print("[train] paused (remove W/.pause to continue)", flush=True)
                paused = True
            time.sleep(1.0)
        return {"checkpoint": self._take(".checkpoint"), "stop": self._take(".stop"),
                "signal": self.signal is not None}


def agree(flags: Mapping[str, bool]) -> dict[str, bool]:
    """A flag raised on any process is raised on all (multi-process runs; one small all-gather).

    Signals and control files reach hosts at different moments (a ``.stop`` on a shared disk is
    taken by whichever host polls first); a host that stopped alone would leave the others
    waiting in the next step's collectives, so every host acts on the union, at the same step.
    """
    if jax.process_count() == 1:
        return dict(flags)
    keys = sorted(flags)
    local = np.asarray([int(bool(flags[k])) for k in keys], np.int32)
    every = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys))
    return {k: bool(v) for k, v in zip(keys, every.any(axis=0))}


def same_on_every_process(values: Mapping[str, float]) -> dict[str, float]:
    """Process 0's values on every host (metrics that drive stop conditions and plateaus must
    be identical everywhere, or hosts would take different decisions)."""
    if jax.process_count() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    bits = np.asarray([values[k] for k in keys], np.float64).view(np.uint32)  # exact, without x64
    got = np.asarray(multihost_utils.broadcast_one_to_all(bits), np.uint32).view(np.float64)
    return {k: float(v) for k, v in zip(keys, got)}


def stop_condition_met(s: Mapping, history: Mapping[str, list]) -> str | None:
    """Whether the stage's stop condition holds on the logged history; the reason if so."""
    if not s.stop_metric:
        return None
    values = history.get(s.stop_metric)
    if values is None:
        return None
    window = [v for v in values[-int(s.stop_window):] if v is not None and math.isfinite(v)]
    if len(window) < int(s.stop_window):
        return None
    mean = float(np.mean(window))
    hit = mean < s.stop_threshold if s.stop_mode == "below" else mean > s.stop_threshold
    if hit:
        return (f"mean of the last {s.stop_window} '{s.stop_metric}' = {mean:.6g} is "
                f"{s.stop_mode} {s.stop_threshold}")
    return None
