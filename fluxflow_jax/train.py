"""The one training loop: build a stage, resume it, step it, log, checkpoint, sample, export.

``build_stage`` is shared by training and by ``python -m fluxflow_jax.export`` (which needs the
same abstract state to read a checkpoint). Every stage starts its own ``TrainState`` at step 0
(so the KL warm-up restarts per stage - the reference's global-step warm-up is §10 item 17);
the JSONL's ``global_step`` adds the steps of the finished stages before it.

Exact resume: the state (params, optimizer, EMA, spectral stats, step), the data-iterator position
and the stop-condition history are in each Orbax checkpoint; per-step RNG is
``fold_in(fold_in(key(seed), stage_index), step)``; so a run killed at any point and restarted
reproduces the uninterrupted run bit for bit on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from fluxflow_jax import (
    cached,
    compile_ahead,
    evaluate,
    interop,
    lora_run,
    optim,
    plots,
    sampling,
    schedules,
    sharding,
    stages,
    weights,
)
from fluxflow_jax import checkpoint as ckpt_lib
from fluxflow_jax import controls as controls_lib
from fluxflow_jax import data as data_lib
from fluxflow_jax import metrics as metrics_lib
from fluxflow_jax import state as state_lib
from fluxflow_jax import steps as steps_lib
from fluxflow_jax import workdir as wd
from fluxflow_jax.models import registry

# A stage's plots take ~0.25 s a figure (about 3 s a stage on 2 cores, mostly matplotlib's text
# layout), and a short run's checkpoints come seconds apart: an interval checkpoint redraws them
# only when the last drawing (or the stage's start) is this old. On a long run (checkpoints
# minutes apart) every checkpoint still redraws; a forced save (signal, .stop / .checkpoint
# file), a divergence and the stage's end always do.
PLOT_EVERY_S = 60.0

# ----------------------------------------------------------------------------------------------
# Building a stage
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stage:
    """Everything static about a stage run (modules, transforms, step functions, data)."""

    name: str
    index: int
    cfg: Any
    model_cfg: Any
    models: registry.ModelSet
    tokenizer: Any
    mesh: Any
    kinds: list
    total_steps: int
    epoch_length: int | None
    global_batch: int
    loader: Any
    rng: jax.Array
    rules: tuple = ()
    max_length: int = 128


def stage_model_config(config: Mapping, tokenizer) -> mlc.ConfigDict:
    """The model config with the tokenizer's vocabulary size and pad id filled in."""
    m = mlc.ConfigDict(config.model.to_dict())
    if "text" in m:
        if not m.text.vocab_size:
            m.text.vocab_size = len(tokenizer)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            m.text.pad_token_id = int(tokenizer.pad_token_id)
    return m


def _labels(kind: str, sub_params: Mapping, trained: set[str]) -> Any:
    mapping = {m: (state_lib.group_of(m) if m in trained else "frozen") for m in sub_params}
    return optim.param_labels(sub_params, mapping)


def make_txs(stage_cfg: Mapping, params: Mapping, total_steps: int, name: str) -> dict:
    """One optax transformation per step kind: a partition over that step's model groups."""
    trained = stages.trained_models(stage_cfg)
    groups = stages.optimizer_groups(stage_cfg)
    txs = {}
    for kind in stages.step_kinds(stage_cfg):
        sub = state_lib.step_params(kind, params)
        group_txs: dict[str, Any] = {"frozen": None}
        for g in groups:
            group_txs[g] = optim.make_optimizer(
                stages.stage_optimizer(stage_cfg, g), stages.stage_scheduler(stage_cfg, g),
                total_steps, name=f"stages.{name}.optimizers.{g}")
        tx = optim.make_partitioned(group_txs, _labels(kind, sub, trained))
        txs[kind] = optim.with_accumulation(tx, int(stage_cfg.grad_accum))
    return txs


def stage_duration(stage_cfg: Mapping, epoch_length: int | None, name: str) -> int:
    """Steps to run: ``steps``, ``epochs * epoch_length``, or the smaller of both."""
    options = []
    if stage_cfg.steps > 0:
        options.append(int(stage_cfg.steps))
    if stage_cfg.epochs > 0:
        if not epoch_length:
            raise ValueError(f"stages.{name}.epochs: the dataset has no known length "
                             "(a stream); give stages.{name}.steps instead")
        options.append(int(stage_cfg.epochs) * int(epoch_length))
    return min(options)


def build_stage(config: Mapping, name: str, *, with_data: bool = True) -> Stage:
    """Modules, tokenizer, mesh, data loader and durations of stage ``name``."""
    s = config.stages[name]
    index = list(config.stage_order).index(name)
    # A pretrained backbone's own tokenizer (its embeddings know those ids) over the default one.
    own = interop.pretrained_tokenizer_dir(config.model.text.pretrained_dir)
    tok = own if own and config.tokenizer in ("", "demo") else config.tokenizer
    tokenizer = data_lib.load_tokenizer(tok or None)
    model_cfg = stage_model_config(config, tokenizer)
    models = registry.build_models(model_cfg, stages.needed_models(s))
    mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
    global_batch = int(s.batch_size or config.batch_size)
    ds_name = stages.dataset_name(config, s)
    loader = None
    epoch_length = None
    if with_data and not s.latent_cache:  # a cached stage's loader needs its weights first
        loader = data_lib.make_loader(
            config.datasets[ds_name], global_batch_size=global_batch,
            seed=int(config.seed) + 1000 * index, tokenizer=tokenizer,
            max_length=int(config.max_length), name=f"datasets.{ds_name}",
            min_size=2 ** int(model_cfg.downscales))  # smaller images cannot be encoded
        loader = lora_run.wrap_loader(s, loader, tokenizer, int(config.max_length))
        epoch_length = getattr(loader, "epoch_length", None)
    total = (stage_duration(s, epoch_length, name) if loader is not None or s.steps
             else int(s.steps))
    rng = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.rng_impl), index)
    return Stage(name=name, index=index, cfg=s, model_cfg=model_cfg, models=models,
                 tokenizer=tokenizer, mesh=mesh, kinds=stages.step_kinds(s),
                 total_steps=total, epoch_length=epoch_length, global_batch=global_batch,
                 loader=loader, rng=rng,
                 rules=tuple(tuple(r) for r in config.sharding_rules),
                 max_length=int(config.max_length))


def with_cached_data(config: Mapping, st: Stage, params: Mapping, workdir: Path) -> Stage:
    """The stage reading its dataset through the latent cache (built on first use)."""
    ds_name = stages.dataset_name(config, st.cfg)
    cache_text = "text_encoder" not in stages.trained_models(st.cfg)
    configs = {n: weights.module_config(getattr(st.models, n)) for n in st.models.names()}
    ds_cfg = cached.cached_dataset(config, ds_name, st.models, params, configs, workdir,
                                   cache_text=cache_text, tokenizer=st.tokenizer)
    loader = data_lib.make_loader(ds_cfg, global_batch_size=st.global_batch,
                                  seed=int(config.seed) + 1000 * st.index, tokenizer=st.tokenizer,
                                  max_length=int(config.max_length), name=f"datasets.{ds_name}")
    epoch_length = getattr(loader, "epoch_length", None)
    return dataclasses.replace(st, loader=loader, epoch_length=epoch_length,
                               total_steps=stage_duration(st.cfg, epoch_length, st.name))


def create_state(st: Stage, params: dict, spectral: dict) -> tuple[state_lib.TrainState, dict]:
    """The stage's initial state and its optax transformations (one per step kind): the one way a
    train state is built (tests and benchmarks call ``state.create_train_state`` the same way).
    A LoRA stage's fresh adapters join ``params`` here (so ``export`` sees the same state)."""
    params = lora_run.add_adapters(st.cfg, params, st.rng)
    txs = make_txs(st.cfg, params, st.total_steps, st.name)
    ema_models = tuple(sorted(stages.trained_models(st.cfg))) if st.cfg.ema_decay > 0 else ()
    return state_lib.create_train_state(params, txs, spectral=spectral,
                                        ema_models=ema_models), txs


def state_shardings(st: Stage, state: Any) -> Any:
    """NamedShardings of every state leaf (the config's sharding rules over the stage's mesh)."""
    rules = sharding.check_rules(list(st.rules)) if st.rules else None
    return sharding.tree_shardings(state, st.mesh, rules)


def abstract_state(state: Any, shardings: Any) -> Any:
    """The state as ShapeDtypeStructs with their shardings (Orbax's restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


def make_step_fns(st: Stage, txs: Mapping, shardings: Any) -> dict[str, Callable]:
    """The jitted step functions this stage runs each iteration."""
    loss_cfg = dict(st.cfg.loss.to_dict())
    loss_cfg.update(
        train_reconstruction=bool(set(st.cfg.train) & {"vae", "reconstruction"}),
        use_gan="gan" in st.cfg.train, use_spade="spade" in st.cfg.train,
        use_lpips="lpips" in st.cfg.train, ema_decay=float(st.cfg.ema_decay),
        ema_warmup=bool(st.cfg.ema_warmup),
        train_text_encoder="text_encoder" in stages.trained_models(st.cfg))
    fns = {}
    makers = {"vae": steps_lib.make_vae_step, "disc": steps_lib.make_disc_step,
              "flow": steps_lib.make_flow_step}
    frozen = tuple(sorted(set(st.models.names()) - stages.trained_models(st.cfg)))
    for i, kind in enumerate(st.kinds):
        # The last step of an iteration advances state.step (one increment per iteration).
        extra = {}
        if kind == "flow" and loss_cfg["cfg_null"] == "empty_prompt":
            ids, mask = data_lib.tokenize(st.tokenizer, [""], int(st.max_length))
            extra["null_prompt"] = {"input_ids": ids, "attention_mask": mask}
        if kind == "flow" and lora_run.stage_lora(st.cfg) is not None:
            extra["lora_cfg"] = lora_run.stage_lora(st.cfg)
        fns[kind] = makers[kind](st.models, txs[kind], loss_cfg, st.mesh, shardings,
                                 frozen=frozen, advance_step=(i == len(st.kinds) - 1), **extra)
    return fns


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def make_plateau_driver(st: Stage) -> schedules.PlateauDriver:
    """The stage's ReduceLROnPlateau groups (none: an empty, falsy driver)."""
    groups = {g: (stages.stage_scheduler(st.cfg, g), float(stages.stage_optimizer(st.cfg, g)["lr"]))
              for g in stages.optimizer_groups(st.cfg)}
    return schedules.make_plateau_driver(groups, st.total_steps, f"stages.{st.name}.schedulers")


def apply_lr_scales(state: state_lib.TrainState, scales: Mapping[str, float]
                    ) -> state_lib.TrainState:
    """Write plateau scales ``{group: scale}`` into the optimizer states that hold those groups."""
    opt_state = dict(state.opt_state)
    for group, scale in scales.items():
        kind = state_lib.kind_of_group(group)
        opt_state[kind] = optim.set_lr_scale(opt_state[kind], scale, group)
    return state.replace(opt_state=opt_state)


_params_finite = jax.jit(steps_lib.common.tree_finite)


def _host_metrics(step_metrics: Mapping) -> dict[str, float]:
    """Device metrics -> floats under both our names and the reference's JSONL names."""
    host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    return {**metrics_lib.reference_metric_names(host), **host}


def train_stage(config: Mapping, name: str, workdir: Path, prev_params: Path | None,
                controls: controls_lib.StopControls) -> dict:
    """Run (or resume) one stage to its end, its stop condition, a stop request, a signal or a
    divergence (``result['diverged']``: nothing saved over the last good checkpoint)."""
    workdir = Path(workdir)
    st = build_stage(config, name)
    params, spectral, carried = weights.initial_variables(config, st.models, st.rng, name,
                                                          prev_params, st.model_cfg)
    if st.cfg.latent_cache:
        st = with_cached_data(config, st, params, workdir)
    state, txs = create_state(st, params, spectral)
    shardings = state_shardings(st, state)
    state = jax.device_put(state, shardings)
    del params
    plateau = make_plateau_driver(st)
    ck = config.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        wd.checkpoint_dir(workdir, name), max_to_keep=int(ck.max_to_keep),
        save_interval_steps=int(ck.interval_steps),
        save_interval_minutes=float(ck.interval_minutes) or None, async_save=bool(ck.async_save))
    history: dict[str, list] = {}
    restored = checkpointer.restore(abstract_state(state, shardings))
    if restored is not None:
        state, data_state, meta = restored
        st.loader.set_state(data_state)
        history = meta.get("history", {})
        plateau.load_state_dict(meta.get("plateau", {}))
        print(f"[{name}] resumed from step {int(state.step)}", flush=True)
    step_fns = make_step_fns(st, txs, shardings)
    offset = wd.global_step_offset(workdir, list(config.stage_order), name)
    step = int(state.step)
    writer = metrics_lib.MetricsWriter(workdir, name, tensorboard=bool(config.tensorboard),
                                       resume_at=offset + step)
    lcfg = lora_run.stage_lora(st.cfg)
    # What samples and evaluations show: EMA where kept, adapters merged into the flow model.
    shown = lambda: lora_run.sampling_view(sampling.sampling_params(state.params, state.ema), lcfg)
    samples = (sampling.stage_sample_maker(config, name, st.models, st.tokenizer, workdir)
               if config.samples.enabled else None)
    evaluator = None
    if int(config.eval.interval_steps) > 0:  # on every host: fsdp weights are gathered by all
        evaluator, _ = evaluate.make_evaluator(
            config, st.models, st.tokenizer, st.cfg, num=int(config.eval.num_images),
            lpips_weights=config.eval.lpips_weights or None)
    result = {"stage": name, "step": step, "total_steps": st.total_steps}
    max_bad = int(config.max_nonfinite_in_a_row)

    def make_samples() -> None:  # grids to samples/ and TensorBoard (weights gathered by all hosts)
        if samples is not None:
            writer.images(offset + step, samples.make(shown(), step))

    plotted_at = [time.monotonic()]  # of this stage's last plots (or its start)

    def draw_plots() -> None:  # W/graph/<stage>_*.png from the JSONL (process 0)
        if jax.process_index() == 0 and config.plots:
            plotted_at[0] = time.monotonic()
            try:
                plots.make_plots(workdir, name)
            except Exception as e:  # plots must never stop training
                print(f"[{name}] plotting failed: {e}", flush=True)

    def save(force: bool, reason: str = "", plot: bool = True) -> bool:
        if not bool(_params_finite(state.params)):  # never write a non-finite state over a good one
            raise FloatingPointError(f"stage {name!r} step {step}: parameters are not finite; "
                                     "not saving over the last good checkpoint")
        meta = {"history": history, "stage": name, "step": step, "reason": reason,
                "rng": np.asarray(jax.random.key_data(st.rng)).tolist(),
                "plateau": plateau.state_dict()}
        did = checkpointer.save(step, state, st.loader.get_state(), meta, force=force)
        if did and plot and (force or time.monotonic() - plotted_at[0] >= PLOT_EVERY_S):
            draw_plots()
        return did

    print(f"[{name}] stage {st.index + 1}/{len(config.stage_order)}: {st.total_steps} steps, "
          f"global batch {st.global_batch}, steps per iteration {'->'.join(st.kinds)}", flush=True)
    if step < st.total_steps:
        print(f"[{name}] compiling {'+'.join(st.kinds)} ...", flush=True)
    # Each batch shape (an aspect bucket, a latent grid) compiles the steps anew: the first here,
    # the others ahead in background threads (compile_ahead=0: each when it arrives); a pause
    # for one mid-stage is announced, since minutes without a word look like a hang.
    compiles = compile_ahead.StageCompiles(name, st.kinds, step_fns, compile_ahead.threads_for(
        int(config.compile_ahead), jax.process_count(), os.cpu_count()))
    pbar = metrics_lib.ProgressBar(st.total_steps, desc=name, initial=step,
                                   active=jax.process_index() == 0)
    last_log_t, last_log_step = time.monotonic(), step
    stopped = None
    nonfinite_seen, bad_in_a_row = int(state.nonfinite), 0
    try:
        if step == 0:
            make_samples()
        while step < st.total_steps:
            req = controls_lib.agree(controls.poll())
            if req["signal"] or req["stop"]:
                why = "signal" if req["signal"] else ".stop file"
                save(True, why)
                checkpointer.wait_until_finished()
                result.update(step=step, interrupted=True, reason=why)
                print(f"\n[{name}] saved a checkpoint at step {step} ({why})", flush=True)
                break
            if req["checkpoint"]:
                save(True, ".checkpoint file")
                make_samples()
            batch = next(st.loader)
            gbatch = sharding.put_batch(batch, st.mesh)
            step_metrics = {}
            shape = compile_ahead.shape_name(gbatch)
            new_shape = compiles.begin(shape, step + 1, pbar.write)  # waits for it, if ahead
            for kind in st.kinds:
                state, m = step_fns[kind](state, gbatch, st.rng)
                step_metrics.update(m)
            if new_shape:  # this first call compiled (or loaded from a cache)
                compiles.end(shape, step + 1, step_metrics, pbar.write)
                if len(compiles.compile_s) == 1:  # the library is chosen: the other shapes
                    compiles.ahead(state, st.rng, gbatch, getattr(
                        st.loader, "upcoming_shapes", lambda n: None)(st.total_steps - step - 1))
            step += 1
            # Divergence: a skipped update changes nothing (steps/common.py); many in a row stop.
            nonfinite = int(state.nonfinite)
            if nonfinite > nonfinite_seen:
                bad_in_a_row += 1
                pbar.write(f"[{name}] step {step}: non-finite loss or gradient, update skipped "
                           f"({bad_in_a_row} in a row, {nonfinite} in total)")
                if bad_in_a_row >= max_bad:
                    result.update(step=step, diverged=True, reason=(
                        f"{bad_in_a_row} non-finite updates in a row (max_nonfinite_in_a_row="
                        f"{max_bad}); the last good checkpoint is kept - lower the learning rate "
                        "or check the data, then run the same command to resume from it"))
                    break
            else:
                bad_in_a_row = 0
            nonfinite_seen = nonfinite
            host = None
            if plateau and plateau.due(step):
                host = _host_metrics(step_metrics)
                changed = plateau.update(step, host)
                if changed:
                    state = apply_lr_scales(state, changed)
                    pbar.write(f"[{name}] step {step}: plateau - lr scale now " + ", ".join(
                        f"{g} x{v:.3g}" for g, v in changed.items()))
            ev = {}
            if evaluator is not None and step % int(config.eval.interval_steps) == 0:
                ev = controls_lib.same_on_every_process(evaluator(shown()))
                pbar.write(f"[{name}] step {step}: " + " ".join(
                    f"{k.split('/', 1)[-1]}={v:.4g}" for k, v in ev.items()))
            if ev or step % int(config.log_interval) == 0 or step == st.total_steps:
                host = {**(host or _host_metrics(step_metrics)), **ev}  # one row per step
                now = time.monotonic()
                batch_time = (now - last_log_t) / max(1, step - last_log_step)
                last_log_t, last_log_step = now, step
                lrs = {k.split("/", 1)[-1]: v for k, v in host.items() if k.startswith("learning/")}
                ref = {k: v for k, v in host.items() if "/" not in k or k in ev}
                for k, v in host.items():
                    history.setdefault(k, []).append(v if math.isfinite(v) else None)
                    del history[k][:-1000]
                epoch = (step - 1) // st.epoch_length if st.epoch_length else 0
                batch_idx = (step - 1) % st.epoch_length if st.epoch_length else step - 1
                writer.write(offset + step, epoch, batch_idx, ref, lrs,
                             {"batch_time": batch_time, "stage_step": step,
                              **compiles.extras(),
                              **{f"data_{k}": v for k, v in st.loader.stats().items()
                                 if isinstance(v, (int, float))}})
                pbar.update(step - pbar.n, **{k: v for k, v in ref.items()
                                               if k in ("vae_loss", "kl_loss", "flow_loss",
                                                        "discriminator_loss", "generator_loss")})
                reason = controls_lib.stop_condition_met(st.cfg, history)
                if reason:
                    stopped = reason
                    print(f"\n[{name}] stop condition met at step {step}: {reason}", flush=True)
                    break
            if checkpointer.should_save(step):
                save(False, "interval")
                make_samples()
    except FloatingPointError as e:
        result.update(step=step, diverged=True, reason=str(e))
    finally:
        compiles.close()
    pbar.close()
    writer.flush()
    if result.get("diverged"):
        print(f"\n[{name}] stopped: {result['reason']}", flush=True)
        draw_plots()  # the curves up to the divergence
    elif not result.get("interrupted"):
        if controls.signal is not None:  # arrived after the last poll: finish, then stop the run
            result["stop_requested"] = True
        save(True, stopped or "end of stage", plot=False)  # drawn below, after the exports
        checkpointer.wait_until_finished()
        make_samples()
        weights.save_stage(workdir, name, st.models, state, carried)
        if lcfg is not None:
            lora_run.save_outputs(workdir, name, st.models, state, carried, lcfg)
        draw_plots()
        if jax.process_count() > 1:  # the next stage reads what process 0 just wrote
            multihost_utils.sync_global_devices(f"fluxflow_jax stage {name} files written")
        result.update(step=step, stopped_early=stopped, nonfinite=int(state.nonfinite),
                      global_step=offset + step)
        print(f"[{name}] finished at step {step}" + (f" ({stopped})" if stopped else ""),
              flush=True)
    writer.close()
    checkpointer.close()
    close = getattr(st.loader, "close", None)
    if close is not None:  # stop the decode threads before the next stage builds its own
        close()
    return result
