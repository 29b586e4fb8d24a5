"""Where a run keeps what: every path of a workdir, and the pipeline's progress file.

::

    W/config.json                       the run's config (as resolved, secrets redacted)
    W/pipeline_state.json               finished stages, their results, the last stop
    W/checkpoints/<stage>/              Orbax checkpoints of the stage in progress
    W/stages/<stage>/params.safetensors a finished stage's weights (the next stage starts here)
    W/export/<stage>/[ema/]             reference-layout safetensors of a finished stage
    W/graph/, W/tb/, W/samples/         metrics JSONL + plots, TensorBoard, sample grids
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax


def config_path(workdir: Path) -> Path:
    return Path(workdir) / "config.json"


def pipeline_state_path(workdir: Path) -> Path:
    return Path(workdir) / "pipeline_state.json"


def checkpoint_dir(workdir: Path, stage: str) -> Path:
    return Path(workdir) / "checkpoints" / stage


def stage_params_path(workdir: Path, stage: str) -> Path:
    return Path(workdir) / "stages" / stage / "params.safetensors"


def export_dir(workdir: Path, stage: str) -> Path:
    return Path(workdir) / "export" / stage


def read_pipeline_state(workdir: Path, stage_order: list[str] | None = None) -> dict:
    """``{'finished': [...], 'current': name|None, 'results': {...}, 'last_stop': {...}}``.

    A damaged file (truncated, not JSON, wrong shape) is moved aside (never deleted) and, given
    ``stage_order``, rebuilt from what is on disk: a stage counts as finished when its param file
    exists and every stage before it is finished too.
    """
    p = pipeline_state_path(workdir)
    if not p.exists():
        return {"finished": [], "current": None}
    try:
        state = json.loads(p.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("finished"), list):
            raise ValueError("no 'finished' list")
        return state
    except (ValueError, UnicodeDecodeError) as e:
        if stage_order is None:
            raise ValueError(f"{p} is damaged ({e}); run the training command to rebuild it") from e
        aside = p.with_name(f"{p.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(p, aside)
        finished = []
        for name in stage_order:
            if not stage_params_path(workdir, name).exists():
                break
            finished.append(name)
        print(f"[pipeline] {p.name} was damaged ({e}); moved to {aside.name} and rebuilt from "
              f"disk: finished = {finished}", flush=True)
        return {"finished": finished, "current": None}


def write_pipeline_state(workdir: Path, state: Mapping) -> None:
    """Atomic write (tmp + rename), process 0 only: a crash never leaves half a file."""
    if jax.process_index() != 0:
        return
    p = pipeline_state_path(workdir)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, p)


def global_step_offset(workdir: Path, stage_order: list[str], name: str) -> int:
    """Steps of the finished stages before ``name`` (the JSONL's ``global_step`` continues)."""
    ps = read_pipeline_state(workdir)
    off = 0
    for n in stage_order:
        if n == name:
            break
        off += int(ps.get("results", {}).get(n, {}).get("step", 0))
    return off
