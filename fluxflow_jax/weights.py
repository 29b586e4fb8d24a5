"""A stage's weights in and out: where its models start, and what it leaves behind.

Start: the previous stage's param file, else ``config.init_from`` (a reference checkpoint or one
of our param files), else a fresh init - checked shape by shape against ``config.model``. Out: our
param file per finished stage and reference-layout exports (``interop``), carrying the module
configs in the safetensors metadata so a later import rebuilds the same modules.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax import interop
from fluxflow_jax import workdir as wd
from fluxflow_jax.models import registry
from fluxflow_jax.sharding import path_str, to_host
from fluxflow_jax.state import TrainState


def module_config(module) -> dict:
    """A linen module's constructor fields as JSON-able kwargs (what interop and param files store)."""
    out = {}
    for f in dataclasses.fields(module):
        if f.name in ("parent", "name", "dtype"):
            continue
        v = getattr(module, f.name)
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[f.name] = v
        elif isinstance(v, (tuple, list)):
            out[f.name] = list(v)
    return out


class WeightsError(ValueError):
    """A stage's starting weights are missing or unreadable (the message names the file)."""


def initial_variables(config: Mapping, models: registry.ModelSet, rng: jax.Array, stage: str,
                      prev_params: Path | None, model_cfg: Mapping | None = None
                      ) -> tuple[dict, dict, dict]:
    """``(params, spectral, carried)``: the stage's models' params and D's spectral stats, plus
    params of models this stage does not use (carried through to its outputs unchanged)."""
    sources: dict[str, tuple[dict, dict]] = {}
    if prev_params is not None:
        # A stage after a finished one must start from its weights: never silently re-create
        # models a finished stage trained.
        if not Path(prev_params).exists():
            raise WeightsError(f"{prev_params} is missing: stage {stage!r} starts from the "
                               "previous stage's weights; restore the file or retrain that stage")
        try:
            sources.update(interop.load_flax_params(prev_params))
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"{prev_params} cannot be read ({e}); restore it from a backup, "
                               "or rebuild it with --config.init_from=<that stage's export "
                               "folder>") from e
    needed = set(models.names())
    missing = needed - set(sources)
    if missing and config.init_from:
        got = interop.load_any(config.init_from, model_cfg=model_cfg)
        for k in missing & set(got):
            interop.check_loaded_config(k, got[k][1], module_config(getattr(models, k)),
                                        config.init_from)
            sources[k] = got[k]
        print(f"[{stage}] initialised {sorted(missing & set(got))} from {config.init_from}",
              flush=True)
    init = lambda ms: registry.init_params(ms, jax.random.fold_in(rng, 10_000),
                                           image_hw=(32, 32), text_len=int(config.max_length))
    # Shapes of every model (no compute) to check loaded weights; real init only for new models.
    shapes, _ = jax.eval_shape(lambda: init(models))
    new = [n for n in models.names() if n not in sources]
    fresh, fresh_spectral = init(dataclasses.replace(
        models, **{n: None for n in models.names() if n in sources})) if new else ({}, {})
    params, spectral, carried = {}, {}, {}
    for n in models.names():
        if n in sources:
            variables = sources[n][0]
            _check_same_shapes(shapes[n], variables["params"], n)
            params[n] = jax.tree.map(jnp.asarray, variables["params"])
            if n == "discriminator":
                if "spectral" not in variables:
                    raise interop.InteropError("weights for 'discriminator' lack its spectral-"
                                               "norm state (u, v)")
                spectral = jax.tree.map(jnp.asarray, variables["spectral"])
        else:
            params[n] = fresh[n]
            if n == "discriminator":
                spectral = fresh_spectral
    pdir = model_cfg.text.pretrained_dir if model_cfg is not None and "text" in model_cfg else ""
    if pdir and "text_encoder" in params and "text_encoder" not in sources:
        # a new text encoder starts from the pretrained backbone (kept as loaded, not re-initialised
        # as the reference does); trained weights of an earlier stage or init_from win
        params["text_encoder"] = jax.tree.map(jnp.asarray, interop.load_pretrained_text_encoder(
            pdir, model_cfg, jax.device_get(params["text_encoder"])))
        print(f"[{stage}] text encoder backbone from {pdir}", flush=True)
    for n, (variables, cfg) in sources.items():
        if n not in params:
            carried[n] = (variables, cfg)
    created = sorted(needed - set(sources))
    if created:
        print(f"[{stage}] created new {created}", flush=True)
    return params, spectral, carried


def _check_same_shapes(expected: Any, got: Any, name: str) -> None:
    e = {path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    g = {path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(got)}
    problems = [f"{k}: model {e[k]} vs checkpoint {g.get(k, 'missing')}" for k in e if e[k] != g.get(k)]
    problems += [f"{k}: unexpected in checkpoint" for k in g if k not in e]
    if problems:
        raise interop.InteropError(f"weights for {name!r} do not fit config.model:\n  " +
                                   "\n  ".join(problems[:20]) +
                                   (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))


def models_for_export(models: registry.ModelSet, state: TrainState, carried: Mapping, *,
                      ema: bool = False) -> dict[str, tuple[dict, dict]]:
    """``{model: (variables, module config)}`` of the state's models (EMA params if ``ema``) plus
    the carried models this stage did not use - what param files and exports hold. A collective
    in multi-process runs (``sharding.to_host``): every process calls it."""
    params = to_host(state.params)
    if ema:
        params = {**params, **to_host(state.ema)}
    out = {}
    for n in models.names():
        variables = {"params": params[n]}
        if n == "discriminator" and state.spectral:
            variables["spectral"] = to_host(state.spectral)
        out[n] = (variables, module_config(getattr(models, n)))
    for n, v in carried.items():
        out.setdefault(n, v)
    return out


def export_stage(workdir: Path, stage: str, models: registry.ModelSet, state: TrainState,
                 carried: Mapping) -> list[Path]:
    """Reference-layout safetensors in ``W/export/<stage>/`` (+ ``ema/`` when EMA is on).
    Every process calls it (the weights are gathered first); process 0 writes."""
    raw = models_for_export(models, state, carried)
    ema = models_for_export(models, state, carried, ema=True) if state.ema else None
    return _write_exports(workdir, stage, raw, ema)


def _write_exports(workdir: Path, stage: str, raw: Mapping, ema: Mapping | None) -> list[Path]:
    if jax.process_index() != 0:
        return []
    out = wd.export_dir(workdir, stage)
    written = interop.export_reference(out, raw)
    if ema is not None:
        written += interop.export_reference(out / "ema", ema)
    return written


def save_stage(workdir: Path, stage: str, models: registry.ModelSet, state: TrainState,
               carried: Mapping) -> list[Path]:
    """A finished stage's outputs: our param file (the next stage's start) and its exports.
    Every process calls it (the weights are gathered first); process 0 writes."""
    raw = models_for_export(models, state, carried)
    ema = models_for_export(models, state, carried, ema=True) if state.ema else None
    if jax.process_index() != 0:
        return []
    params_file = interop.save_flax_params(wd.stage_params_path(workdir, stage), raw)
    return [params_file] + _write_exports(workdir, stage, raw, ema)
