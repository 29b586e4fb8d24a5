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

from fluxflow_jax import controls as controls_lib
from fluxflow_jax import data as data_lib
from fluxflow_jax import stages, train, weights
from fluxflow_jax import workdir as wd

# Exit codes of ``python -m fluxflow_jax.main`` (also in its --help and the README).
EXIT_OK, EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 75


def run(config: Mapping, workdir: str | os.PathLike,
        controls: controls_lib.StopControls | None = None) -> dict:
    """Run every unfinished stage in order. Returns the pipeline state (finished stages, stops).

    SIGTERM/SIGINT are caught for the whole run (building, compiling, training, exporting): inside
    the step loop the stage saves a checkpoint at its current step; anywhere else the current piece
    of work finishes and the run stops before the next stage. ``exit_code(state)`` says how it ended.
    """
    workdir = Path(workdir)
    if controls is None:
        with controls_lib.StopControls(workdir) as own:
            return run(config, workdir, own)
    errors = stages.validate_config(config) + stages.resume_errors(config, workdir)
    if errors:
        raise stages.ConfigError(errors)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        wd.config_path(workdir).write_text(data_lib.redacted_json(config))  # no secrets on disk
    pstate = wd.read_pipeline_state(workdir, list(config.stage_order))
    prev_params: Path | None = None
    for name in config.stage_order:
        if name in pstate["finished"]:
            print(f"[pipeline] stage {name!r} already finished - skipping", flush=True)
            prev_params = wd.stage_params_path(workdir, name)
            continue
        if controls.signal is not None:
            return _stop(workdir, pstate, {"stage": name, "interrupted": True,
                                           "reason": "signal before the stage started"})
        if prev_params is not None and not prev_params.exists():
            raise weights.WeightsError(
                f"{prev_params} is missing: stage {name!r} starts from the finished stage "
                f"before it. Restore the file, or rebuild it from that stage's export with "
                f"--config.init_from={wd.export_dir(workdir, prev_params.parent.name)}, "
                f"or remove the stage from 'finished' in {wd.pipeline_state_path(workdir)} to "
                "train it again")
        pstate["current"] = name
        wd.write_pipeline_state(workdir, pstate)
        result = train.train_stage(config, name, workdir, prev_params, controls)
        if result.get("interrupted") or result.get("diverged"):
            if result.get("interrupted"):
                print(f"[pipeline] stage {name!r} interrupted at step {result.get('step')} - "
                      "run the same command again to resume", flush=True)
            return _stop(workdir, pstate, result)
        pstate["finished"].append(name)
        pstate.setdefault("results", {})[name] = result
        pstate["current"] = None
        if result.get("stop_requested"):
            return _stop(workdir, pstate, {**result, "interrupted": True})
        wd.write_pipeline_state(workdir, pstate)
        prev_params = wd.stage_params_path(workdir, name)
    pstate.pop("last_stop", None)
    wd.write_pipeline_state(workdir, pstate)
    if jax.process_index() == 0:
        print(summary(workdir, pstate), flush=True)
    return pstate


def _stop(workdir: Path, pstate: dict, result: Mapping) -> dict:
    pstate["last_stop"] = dict(result)
    wd.write_pipeline_state(workdir, pstate)
    return pstate


def exit_code(pstate: Mapping) -> int:
    """0 finished, 3 diverged, 75 interrupted (run the same command to resume)."""
    stop = pstate.get("last_stop") or {}
    if stop.get("diverged"):
        return EXIT_DIVERGED
    if stop.get("interrupted"):
        return EXIT_INTERRUPTED
    return EXIT_OK


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
