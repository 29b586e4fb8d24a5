"""Runs ``config.stages`` in ``config.stage_order``: the reference's multi-step pipeline without its crashes.

Resume: ``W/pipeline_state.json`` lists finished stages (never re-run); a stage's own Orbax
checkpoints resume it mid-way; a finished stage's final weights are the next stage's start (paths:
``workdir.py``). What a stage means and whether a config is valid: ``stages.py``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import jax

from fluxflow_jax import stages, train
from fluxflow_jax import workdir as wd


def run(config: Mapping, workdir: str | os.PathLike) -> dict:
    """Run every unfinished stage in order. Returns the pipeline state (finished stages, stops)."""
    stages.check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        wd.config_path(workdir).write_text(config.to_json_best_effort(indent=2))
    pstate = wd.read_pipeline_state(workdir)
    prev_params: Path | None = None
    for name in config.stage_order:
        if name in pstate["finished"]:
            print(f"[pipeline] stage {name!r} already finished - skipping", flush=True)
            prev_params = wd.stage_params_path(workdir, name)
            continue
        pstate["current"] = name
        wd.write_pipeline_state(workdir, pstate)
        result = train.train_stage(config, name, workdir, prev_params)
        if result.get("interrupted"):
            print(f"[pipeline] stage {name!r} interrupted at step {result.get('step')} - "
                  "run the same command again to resume", flush=True)
            pstate["last_stop"] = result
            wd.write_pipeline_state(workdir, pstate)
            return pstate
        pstate["finished"].append(name)
        pstate.setdefault("results", {})[name] = result
        pstate["current"] = None
        if result.get("stop_requested"):
            pstate["last_stop"] = {**result, "interrupted": True}
            wd.write_pipeline_state(workdir, pstate)
            return pstate
        wd.write_pipeline_state(workdir, pstate)
        prev_params = wd.stage_params_path(workdir, name)
    if jax.process_index() == 0:
        print(summary(workdir, pstate), flush=True)
    return pstate


def summary(workdir: Path, pstate: Mapping) -> str:
    """The closing lines: what finished and where to look."""
    lines = [f"[pipeline] all {len(pstate['finished'])} stage(s) finished: "
             + ", ".join(f"{n} ({pstate.get('results', {}).get(n, {}).get('step', '?')} steps)"
                         for n in pstate["finished"])]
    for what, path in (("exports (reference layout)", workdir / "export"),
                       ("sample grids", workdir / "samples"),
                       ("metrics JSONL and plots", workdir / "graph"),
                       ("TensorBoard", workdir / "tb")):
        if path.exists():
            lines.append(f"  {what}: {path}")
    if (workdir / "tb").exists():
        lines.append(f"  tensorboard --logdir {workdir / 'tb'}")
    return "\n".join(lines)
