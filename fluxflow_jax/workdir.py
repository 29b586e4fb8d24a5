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


def read_pipeline_state(workdir: Path) -> dict:
    """``{'finished': [...], 'current': name|None, 'results': {...}, 'last_stop': {...}}``."""
    p = pipeline_state_path(workdir)
    if p.exists():
        return json.loads(p.read_text())
    return {"finished": [], "current": None}


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
