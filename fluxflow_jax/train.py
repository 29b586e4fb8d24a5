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
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from fluxflow_jax import checkpoint as ckpt_lib
from fluxflow_jax import data as data_lib
from fluxflow_jax import interop, metrics as metrics_lib, optim, pipeline, sharding
from fluxflow_jax import state as state_lib
from fluxflow_jax import steps as steps_lib
from fluxflow_jax.models import registry

# Our namespaced metric names -> the reference's JSONL names (REFERENCE.md §7).
REFERENCE_NAMES = {
    "train/loss_recon": "vae_loss", "train/kl": "kl_loss", "train/kl_beta": "kl_beta",
    "train/loss_g": "generator_loss", "train/loss_d": "discriminator_loss",
    "train/lpips": "lpips_loss", "train/loss_flow": "flow_loss",
    "train/color_stats": "color_stats", "train/hist": "hist_loss",
    "train/contrast": "contrast_loss",
}


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
    txs: dict
    kinds: list
    total_steps: int
    epoch_length: Optional[int]
    global_batch: int
    loader: Any
    rng: jax.Array
    rules: tuple = ()
    max_length: int = 128
    state_shardings: Any = None
    step_fns: dict = dataclasses.field(default_factory=dict)


def stage_model_config(config: Mapping, tokenizer) -> mlc.ConfigDict:
    """The model config with the tokenizer's vocabulary size and pad id filled in."""
    m = mlc.ConfigDict(config.model.to_dict())
    if "text" in m:
        if not m.text.vocab_size:
            m.text.vocab_size = len(tokenizer)
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is not None:
            m.text.pad_token_id = int(tokenizer.pad_token_id)
    return m


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


def _labels(kind: str, sub_params: Mapping, trained: set[str]) -> Any:
    group = {"compressor": "vae", "expander": "vae", "discriminator": "discriminator",
             "flow": "flow", "text_encoder": "text_encoder"}
    mapping = {m: (group[m] if m in trained else "frozen") for m in sub_params}
    return optim.param_labels(sub_params, mapping)


def make_txs(stage_cfg: Mapping, params: Mapping, total_steps: int, name: str) -> dict:
    """One optax transformation per step kind: a partition over that step's model groups."""
    trained = pipeline.trained_models(stage_cfg)
    groups = pipeline.optimizer_groups(stage_cfg)
    txs = {}
    for kind in pipeline.step_kinds(stage_cfg):
        sub = state_lib.step_params(kind, params)
        group_txs: dict[str, Any] = {"frozen": None}
        for g in groups:
            group_txs[g] = optim.make_optimizer(
                pipeline.stage_optimizer(stage_cfg, g), pipeline.stage_scheduler(stage_cfg, g),
                total_steps, name=f"stages.{name}.optimizers.{g}")
        tx = optim.make_partitioned(group_txs, _labels(kind, sub, trained))
        txs[kind] = optim.with_accumulation(tx, int(stage_cfg.grad_accum))
    return txs


def stage_duration(stage_cfg: Mapping, epoch_length: Optional[int], name: str) -> int:
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
    tokenizer = data_lib.load_tokenizer(config.tokenizer or None)
    model_cfg = stage_model_config(config, tokenizer)
    models = registry.build_models(model_cfg, pipeline.needed_models(s))
    mesh = sharding.make_mesh(tuple(tuple(a) for a in config.mesh))
    global_batch = int(s.batch_size or config.batch_size)
    ds_name = pipeline.dataset_name(config, s)
    loader = None
    epoch_length = None
    if with_data:
        loader = data_lib.make_loader(
            config.datasets[ds_name], global_batch_size=global_batch,
            seed=int(config.seed) + 1000 * index, tokenizer=tokenizer,
            max_length=int(config.max_length), name=f"datasets.{ds_name}")
        epoch_length = getattr(loader, "epoch_length", None)
    total = stage_duration(s, epoch_length, name) if with_data or s.steps else int(s.steps)
    rng = jax.random.fold_in(jax.random.key(int(config.seed), impl=config.rng_impl), index)
    return Stage(name=name, index=index, cfg=s, model_cfg=model_cfg, models=models,
                 tokenizer=tokenizer, mesh=mesh, txs={}, kinds=pipeline.step_kinds(s),
                 total_steps=total, epoch_length=epoch_length, global_batch=global_batch,
                 loader=loader, rng=rng,
                 rules=tuple(tuple(r) for r in config.sharding_rules),
                 max_length=int(config.max_length))


# ----------------------------------------------------------------------------------------------
# Initial parameters: previous stage -> init_from -> fresh
# ----------------------------------------------------------------------------------------------

def initial_variables(config: Mapping, st: Stage, prev_params: Optional[Path]
                      ) -> tuple[dict, dict, dict]:
    """``(params, spectral, carried)``: the stage's models' params and D's spectral stats, plus
    params of models this stage does not use (carried through to its outputs unchanged)."""
    sources: dict[str, tuple[dict, dict]] = {}
    if prev_params is not None and Path(prev_params).exists():
        sources.update(interop.load_flax_params(prev_params))
    needed = set(st.models.names())
    missing = needed - set(sources)
    if missing and config.init_from:
        got = interop.load_any(config.init_from)
        for k in missing & set(got):
            sources[k] = got[k]
        print(f"[{st.name}] initialised {sorted(missing & set(got))} from {config.init_from}",
              flush=True)
    init = lambda ms: registry.init_params(ms, jax.random.fold_in(st.rng, 10_000),
                                           image_hw=(32, 32), text_len=int(config.max_length))
    # Shapes of every model (no compute) to check loaded weights; real init only for new models.
    shapes, _ = jax.eval_shape(lambda: init(st.models))
    new = [n for n in st.models.names() if n not in sources]
    fresh, fresh_spectral = init(dataclasses.replace(
        st.models, **{n: None for n in st.models.names() if n in sources})) if new else ({}, {})
    params, spectral, carried = {}, {}, {}
    for n in st.models.names():
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
    for n, (variables, cfg) in sources.items():
        if n not in params:
            carried[n] = (variables, cfg)
    created = sorted(needed - set(sources))
    if created:
        print(f"[{st.name}] created new {created}", flush=True)
    return params, spectral, carried


def _check_same_shapes(expected: Any, got: Any, name: str) -> None:
    e = {ckpt_lib.path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    g = {ckpt_lib.path_str(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(got)}
    problems = [f"{k}: model {e[k]} vs checkpoint {g.get(k, 'missing')}" for k in e if e[k] != g.get(k)]
    problems += [f"{k}: unexpected in checkpoint" for k in g if k not in e]
    if problems:
        raise interop.InteropError(f"weights for {name!r} do not fit config.model:\n  " +
                                   "\n  ".join(problems[:20]) +
                                   (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""))


def create_state(st: Stage, params: dict, spectral: dict) -> state_lib.TrainState:
    st.txs = make_txs(st.cfg, params, st.total_steps, st.name)
    ema_models = tuple(sorted(pipeline.trained_models(st.cfg))) if st.cfg.ema_decay > 0 else ()
    return state_lib.create_train_state(params, st.txs, spectral=spectral, ema_models=ema_models)


def place_state(st: Stage, state: state_lib.TrainState) -> state_lib.TrainState:
    rules = sharding.check_rules(list(st.rules)) if st.rules else None
    st.state_shardings = sharding.tree_shardings(state, st.mesh, rules)
    return jax.device_put(state, st.state_shardings)


def abstract_state(st: Stage, state: state_lib.TrainState) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, st.state_shardings)


def make_step_fns(st: Stage) -> dict[str, Callable]:
    """The jitted step functions this stage runs each iteration."""
    loss_cfg = dict(st.cfg.loss.to_dict())
    loss_cfg.update(
        train_reconstruction=bool(set(st.cfg.train) & {"vae", "reconstruction"}),
        use_gan="gan" in st.cfg.train, use_spade="spade" in st.cfg.train,
        use_lpips="lpips" in st.cfg.train, ema_decay=float(st.cfg.ema_decay),
        train_text_encoder="text_encoder" in pipeline.trained_models(st.cfg))
    fns = {}
    makers = {"vae": steps_lib.make_vae_step, "disc": steps_lib.make_disc_step,
              "flow": steps_lib.make_flow_step}
    frozen = tuple(sorted(set(st.models.names()) - pipeline.trained_models(st.cfg)))
    for i, kind in enumerate(st.kinds):
        # The last step of an iteration advances state.step (one increment per iteration).
        extra = {}
        if kind == "flow" and loss_cfg["cfg_null"] == "empty_prompt":
            ids, mask = data_lib.tokenize(st.tokenizer, [""], int(st.max_length))
            extra["null_prompt"] = {"input_ids": ids, "attention_mask": mask}
        fns[kind] = makers[kind](st.models, st.txs[kind], loss_cfg, st.mesh, st.state_shardings,
                                 frozen=frozen, advance_step=(i == len(st.kinds) - 1), **extra)
    return fns


# ----------------------------------------------------------------------------------------------
# Stop controls: signals and files in the workdir
# ----------------------------------------------------------------------------------------------

class StopControls:
    """SIGTERM/SIGINT and ``W/.pause``, ``W/.checkpoint``, ``W/.stop`` files."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.signal: Optional[int] = None
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
        self.signal = signum
        print(f"\n[train] received {signal.Signals(signum).name}: saving a checkpoint and exiting",
              flush=True)

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


# ----------------------------------------------------------------------------------------------
# Stop condition
# ----------------------------------------------------------------------------------------------

def stop_condition_met(s: Mapping, history: Mapping[str, list]) -> Optional[str]:
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


def reference_metric_names(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics keyed by both our names and the reference's JSONL names."""
    out = {}
    for k, v in metrics.items():
        if k.startswith("learning/"):
            continue
        out[REFERENCE_NAMES.get(k, k.split("/", 1)[-1])] = v
    return out


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def _global_offset(workdir: Path, config: Mapping, name: str) -> int:
    ps = pipeline.read_pipeline_state(workdir)
    off = 0
    for n in config.stage_order:
        if n == name:
            break
        off += int(ps.get("results", {}).get(n, {}).get("step", 0))
    return off


def _models_for_export(st: Stage, state: state_lib.TrainState, carried: Mapping, *,
                       ema: bool = False) -> dict[str, tuple[dict, dict]]:
    params = jax.device_get(state.params)
    if ema:
        params = {**params, **jax.device_get(state.ema)}
    out = {}
    for n in st.models.names():
        variables = {"params": params[n]}
        if n == "discriminator" and state.spectral:
            variables["spectral"] = jax.device_get(state.spectral)
        out[n] = (variables, module_config(getattr(st.models, n)))
    for n, v in carried.items():
        out.setdefault(n, v)
    return out


def export_stage(workdir: Path, st: Stage, state: state_lib.TrainState, carried: Mapping) -> list[Path]:
    """Reference-layout safetensors in ``W/export/<stage>/`` (+ ``ema/`` when EMA is on)."""
    if jax.process_index() != 0:
        return []
    out = workdir / "export" / st.name
    written = interop.export_reference(out, _models_for_export(st, state, carried))
    if state.ema:
        written += interop.export_reference(out / "ema", _models_for_export(st, state, carried,
                                                                            ema=True))
    return written


def train_stage(config: Mapping, name: str, workdir: Path,
                prev_params: Optional[Path]) -> dict:
    """Run (or resume) one stage to its end, its stop condition, a stop request or a signal."""
    from fluxflow_jax import sampling
    workdir = Path(workdir)
    st = build_stage(config, name)
    params, spectral, carried = initial_variables(config, st, prev_params)
    state = place_state(st, create_state(st, params, spectral))
    del params
    ck = config.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        workdir / "checkpoints" / name, max_to_keep=int(ck.max_to_keep),
        save_interval_steps=int(ck.interval_steps),
        save_interval_minutes=float(ck.interval_minutes) or None, async_save=bool(ck.async_save))
    history: dict[str, list] = {}
    restored = checkpointer.restore(abstract_state(st, state))
    if restored is not None:
        state, data_state, meta = restored
        st.loader.set_state(data_state)
        history = meta.get("history", {})
        print(f"[{name}] resumed from step {int(state.step)}", flush=True)
    step_fns = make_step_fns(st)
    writer = metrics_lib.MetricsWriter(workdir, name, tensorboard=bool(config.tensorboard))
    offset = _global_offset(workdir, config, name)
    step = int(state.step)
    samples = sampling.SampleMaker(config, st, workdir) if config.samples.enabled else None
    result = {"stage": name, "step": step, "total_steps": st.total_steps}

    def save(force: bool, reason: str = "") -> bool:
        meta = {"history": history, "stage": name, "step": step, "reason": reason,
                "rng": np.asarray(jax.random.key_data(st.rng)).tolist()}
        did = checkpointer.save(step, state, st.loader.get_state(), meta, force=force)
        if did and jax.process_index() == 0 and config.plots:
            try:
                metrics_lib.make_plots(workdir, name)
            except Exception as e:  # plots must never stop training
                print(f"[{name}] plotting failed: {e}", flush=True)
        return did

    print(f"[{name}] {st.total_steps} steps, global batch {st.global_batch}, "
          f"steps per iteration {'->'.join(st.kinds)}", flush=True)
    pbar = metrics_lib.ProgressBar(st.total_steps, desc=name, initial=step)
    last_log_t, last_log_step = time.monotonic(), step
    stopped = None
    with StopControls(workdir) as controls:
        if samples is not None and step == 0:
            samples.make(state, step)
        while step < st.total_steps:
            req = controls.poll()
            if req["signal"] or req["stop"]:
                save(True, "signal" if req["signal"] else "stop file")
                checkpointer.wait_until_finished()
                result.update(step=step, interrupted=True,
                              reason="signal" if req["signal"] else ".stop file")
                break
            if req["checkpoint"]:
                save(True, ".checkpoint file")
                if samples is not None:
                    samples.make(state, step)
            batch = next(st.loader)
            gbatch = sharding.put_batch(batch, st.mesh)
            step_metrics = {}
            for kind in st.kinds:
                state, m = step_fns[kind](state, gbatch, st.rng)
                step_metrics.update(m)
            step += 1
            if step % int(config.log_interval) == 0 or step == st.total_steps:
                host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                now = time.monotonic()
                batch_time = (now - last_log_t) / max(1, step - last_log_step)
                last_log_t, last_log_step = now, step
                lrs = {k.split("/", 1)[-1]: v for k, v in host.items() if k.startswith("learning/")}
                ref = reference_metric_names(host)
                for k, v in {**ref, **{k: v for k, v in host.items()}}.items():
                    history.setdefault(k, []).append(v if math.isfinite(v) else None)
                    del history[k][:-1000]
                epoch = (step - 1) // st.epoch_length if st.epoch_length else 0
                batch_idx = (step - 1) % st.epoch_length if st.epoch_length else step - 1
                writer.write(offset + step, epoch, batch_idx, ref, lrs,
                             {"batch_time": batch_time, "stage_step": step,
                              **{f"data_{k}": v for k, v in st.loader.stats().items()
                                 if isinstance(v, (int, float))}})
                pbar.update(step - pbar.n, **{k: v for k, v in ref.items()
                                               if k in ("vae_loss", "kl_loss", "flow_loss",
                                                        "discriminator_loss", "generator_loss")})
                reason = stop_condition_met(st.cfg, history)
                if reason:
                    stopped = reason
                    print(f"\n[{name}] stop condition met at step {step}: {reason}", flush=True)
                    break
            if checkpointer.should_save(step):
                save(False, "interval")
                if samples is not None:
                    samples.make(state, step)
        late_signal = controls.signal is not None and not result.get("interrupted")
    pbar.close()
    writer.flush()
    if late_signal:  # arrived after the last poll: finish this stage, then stop the pipeline
        result["stop_requested"] = True
    if not result.get("interrupted"):
        save(True, stopped or "end of stage")
        checkpointer.wait_until_finished()
        if samples is not None:
            samples.make(state, step)
        if jax.process_index() == 0:
            interop.save_flax_params(pipeline.stage_params_path(workdir, name),
                                     _models_for_export(st, state, carried))
            export_stage(workdir, st, state, carried)
            if config.plots:
                metrics_lib.make_plots(workdir, name)
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
