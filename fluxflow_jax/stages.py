"""What a stage means, whether a config is valid, and the plan a run will follow.

A stage's ``train`` flags (the reference's mode flags, REFERENCE.md 3.1) decide which models it
updates, which it needs frozen, which jitted steps run per iteration and which optimizer groups it
configures - all read from ``TRAIN_FLAGS`` below and the model table in ``state.MODELS``.
``validate_config`` collects every problem of a config, each naming its key, so a user fixes them
in one go; ``describe_plan`` is what ``--validate`` prints.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections as mlc

from fluxflow_jax import config_defaults as cd
from fluxflow_jax import interop, lora, losses, metrics, optim, schedules, steps
from fluxflow_jax.data import validate_dataset_config
from fluxflow_jax.models import registry
from fluxflow_jax.models.bezier import ACTIVATIONS, HEAD_ACTIVATIONS
from fluxflow_jax.state import MODEL_NAMES, OPT_GROUPS, STEP_KINDS, group_of

STOP_MODES = ("below", "above")


class Flag(NamedTuple):
    """What one ``train`` entry implies."""

    trains: tuple[str, ...]  # models it updates
    needs: tuple[str, ...]  # models that must exist (trained or frozen)
    kinds: tuple[str, ...]  # step kinds it runs


_VAE = ("compressor", "expander")
_FLOW = _VAE + ("flow", "text_encoder")
TRAIN_FLAGS: dict[str, Flag] = {
    "vae": Flag(_VAE, _VAE, ("vae",)),
    "reconstruction": Flag(_VAE, _VAE, ("vae",)),
    "spade": Flag(_VAE, _VAE, ("vae",)),
    "lpips": Flag((), _VAE, ("vae",)),
    "gan": Flag(("discriminator",), _VAE + ("discriminator",), ("disc", "vae")),
    "flow": Flag(("flow",), _FLOW, ("flow",)),
    "text_encoder": Flag(("text_encoder",), _FLOW, ("flow",)),
    # LoRA fine-tuning: adapters over the frozen flow model (the stage's ``lora`` block, lora.py)
    "lora": Flag(("flow_lora",), _FLOW, ("flow",)),
}
TRAINABLE = tuple(TRAIN_FLAGS)


class ConfigError(ValueError):
    """Every problem of a config, one per line, each naming its key."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid config:\n  - " + "\n  - ".join(self.errors))


def _flags(stage: Mapping) -> list[Flag]:
    return [TRAIN_FLAGS[t] for t in stage.train if t in TRAIN_FLAGS]


def trained_models(stage: Mapping) -> set[str]:
    """Models whose parameters a stage updates."""
    return {m for f in _flags(stage) for m in f.trains} - set(stage.freeze)


def needed_models(stage: Mapping) -> set[str]:
    """Models a stage needs to exist (trained or used frozen)."""
    return {m for f in _flags(stage) for m in f.needs}


def step_kinds(stage: Mapping) -> list[str]:
    """Which step functions run per iteration, in ``state.STEP_KINDS`` order (D before G)."""
    kinds = {k for f in _flags(stage) for k in f.kinds}
    return [k for k in STEP_KINDS if k in kinds]


def optimizer_groups(stage: Mapping) -> list[str]:
    """Optimizer groups a stage needs: one per trained model group."""
    groups = {group_of(m) for m in trained_models(stage)}
    return [g for g in OPT_GROUPS if g in groups]


def logged_metrics(stage: Mapping) -> set[str]:
    """Every metric name a stage may log: its steps' namespaced names, the reference's JSONL names
    of those, and ``learning/lr_<group>`` (what ``stop_metric`` and plateau ``metric`` may name)."""
    names = {m for k in step_kinds(stage) for m in steps.METRICS[k]}
    names |= set(metrics.reference_metric_names(dict.fromkeys(names, 0.0)))
    return names | {f"learning/lr_{g}" for g in optimizer_groups(stage)}


def spade_trained(config: Mapping, stage: str) -> bool:
    """Whether the expander has been trained with SPADE context by the end of ``stage`` (a stage
    with ``spade`` in ``train`` at or before it): decoding with context is right only then.
    ``samples.spade`` 'on'/'off' overrides it for weights this run did not train (a LoRA run's
    ``init_from`` base: the config cannot see how that expander was trained)."""
    forced = config.get("samples", {}).get("spade", "auto")
    if forced in ("on", "off"):
        return forced == "on"
    order = list(config["stage_order"])
    upto = order[: order.index(stage) + 1] if stage in order else order
    return any("spade" in config["stages"][n]["train"] for n in upto)


def dataset_name(config: Mapping, stage: Mapping) -> str:
    return stage.dataset or config.default_dataset


# ----------------------------------------------------------------------------------------------
# Validation: collect everything, then raise once
# ----------------------------------------------------------------------------------------------

def validate_config(config: Mapping, *, check_paths: bool = True) -> list[str]:
    """All problems of a config as ``'<key>: <problem>'`` strings (empty when valid).

    ``check_paths=False`` skips whether data paths exist (a config checked away from its data)."""
    errs: list[str] = []
    order = list(config.stage_order)
    stages = config.stages
    if not order:
        errs.append("stage_order: no stages (give the names of config.stages to run, in order)")
    for n in order:
        if n not in stages:
            errs.append(f"stage_order: {n!r} is not a key of config.stages {sorted(stages)}")
    if len(set(order)) != len(order):
        errs.append(f"stage_order: duplicate names in {order}")
    if config.rng_impl not in ("threefry2x32", "rbg", "unsafe_rbg"):
        errs.append(f"rng_impl: {config.rng_impl!r} not in ('threefry2x32', 'rbg', 'unsafe_rbg')")
    ahead = config.get("compile_ahead", -1)
    if isinstance(ahead, bool) or not isinstance(ahead, int) or ahead < -1:
        errs.append(f"compile_ahead: {ahead!r} is not a thread count: give one >= 1, -1 (one "
                    "per 4 CPU cores) or 0 (each batch shape compiles when first met)")
    if config.batch_size <= 0:
        errs.append(f"batch_size: must be > 0, got {config.batch_size}")
    if not config.datasets:
        errs.append("datasets: no datasets defined")
    if config.default_dataset and config.default_dataset not in config.datasets:
        errs.append(f"default_dataset: {config.default_dataset!r} not in datasets "
                    f"{sorted(config.datasets)}")
    errs += _unknown_keys(config)
    errs += _validate_model(config.model)
    errs += _validate_datasets(config, check_paths)
    n_dev = jax.device_count()
    for key, bs in [("batch_size", config.batch_size)] + [
            (f"stages.{n}.batch_size", stages[n].batch_size) for n in stages
            if stages[n].batch_size]:
        if bs > 0 and bs % n_dev:
            errs.append(f"{key}: {bs} is not divisible by the {n_dev} devices the batch is split "
                        f"over; use a multiple of {n_dev}")
    if config.tokenizer not in ("", "demo") and not Path(config.tokenizer).is_dir():
        errs.append(f"tokenizer: {config.tokenizer!r} is neither 'demo' nor a local directory")
    if config.samples.get("spade", "auto") not in ("auto", "on", "off"):
        errs.append(f"samples.spade: {config.samples.spade!r} not in ('auto', 'on', 'off')")
    if config.init_from and not Path(config.init_from).exists():
        errs.append(f"init_from: {config.init_from!r} does not exist")
    for n in stages:
        errs += _validate_stage(config, n, stages[n])
    return errs


def check_config(config: Mapping) -> None:
    errs = validate_config(config)
    if errs:
        raise ConfigError(errs)


def _unknown_keys(config: Mapping) -> list[str]:
    """Keys no part of the code reads: at the top level, in checkpoint.* and samples.*."""
    base = cd.base_config()
    errs = []
    sections = [("", config, base)] + [(f"{k}.", config.get(k, {}), base[k])
                                       for k in ("checkpoint", "samples", "eval")]
    for section, have, known in sections:
        for k in have:
            if k not in known:
                close = difflib.get_close_matches(k, list(known), n=1)
                errs.append(f"{section}{k}: unknown key" +
                            (f" (did you mean {close[0]!r}?)" if close else
                             f" (known: {sorted(known)})"))
    return errs


def _validate_model(m: Mapping) -> list[str]:
    errs = []
    for k in ("vae_dim", "downscales", "upscales", "vae_attn_heads", "flow_dim", "flow_layers",
              "flow_heads", "text_embedding_dim", "max_hw"):
        if m[k] <= 0:
            errs.append(f"model.{k}: must be > 0, got {m[k]}")
    if m.vae_attn_heads > 0 and m.vae_dim % m.vae_attn_heads:
        errs.append(f"model.vae_attn_heads: {m.vae_attn_heads} does not divide vae_dim {m.vae_dim}")
    if m.flow_heads > 0 and m.flow_dim % (2 * m.flow_heads):
        errs.append(f"model.flow_heads: 2*{m.flow_heads} does not divide flow_dim {m.flow_dim} "
                    "(RoPE needs an even head size)")
    if m.activation not in ACTIVATIONS:
        errs.append(f"model.activation: {m.activation!r} not in {ACTIVATIONS}")
    if m.get("vae_head_activation", "") not in HEAD_ACTIVATIONS:
        errs.append(f"model.vae_head_activation: {m.vae_head_activation!r} not in "
                    f"{HEAD_ACTIVATIONS}")
    if m.dtype not in ("float32", "bfloat16"):
        errs.append(f"model.dtype: {m.dtype!r} not in ('float32', 'bfloat16')")
    if m.text.pretrained_dir and not Path(m.text.pretrained_dir).is_dir():
        errs.append(f"model.text.pretrained_dir: {m.text.pretrained_dir!r} is not a directory")
    elif m.text.pretrained_dir:
        text = {k: v for k, v in m.text.items() if not (k == "vocab_size" and not v)}
        try:  # its config.json must agree with config.model.text (vocab filled from the tokenizer)
            interop.check_pretrained_config(m.text.pretrained_dir, text)
        except FileNotFoundError as e:
            errs.append(f"model.text.pretrained_dir: {e.filename} is missing (a local Hugging "
                        "Face DistilBERT folder holds config.json and model.safetensors)")
        except (interop.InteropError, ValueError) as e:
            errs.append(f"model.text.pretrained_dir: {e}")
    errs += registry.model_key_errors(m)
    if m.text.pooling not in ("mean", "masked_mean"):
        errs.append(f"model.text.pooling: {m.text.pooling!r} not in ('mean', 'masked_mean')")
    return errs


def _validate_datasets(config: Mapping, check_paths: bool = True) -> list[str]:
    errs = []
    for name in config.datasets:
        ds = config.datasets[name]
        found = validate_dataset_config(ds, name=f"datasets.{name}")
        errs += found
        if found or not check_paths:
            continue
        for key in ("image_folder", "captions_file", "path", "data_dir", "scan_cache"):
            value = ds.get(key)
            if value and key != "scan_cache" and not Path(value).exists():
                errs.append(f"datasets.{name}.{key}: {value!r} does not exist")
        urls = ds.get("urls")
        if urls and isinstance(urls, str) and "://" not in urls and not urls.startswith("pipe:"):
            first = urls.split("::")[0].split("{")[0]
            if "{" not in urls and not Path(first).exists():
                errs.append(f"datasets.{name}.urls: {first!r} does not exist")
    return errs


def _validate_stage(config: Mapping, key: str, s: Mapping) -> list[str]:
    p = f"stages.{key}"
    errs = []
    known = set(cd.STAGE_DEFAULTS) | {"optimizers", "schedulers", "loss", "lora"}
    for k in s:
        if k not in known:
            errs.append(f"{p}.{k}: unknown key (known: {sorted(known)})")
    if s.name and s.name != key:
        errs.append(f"{p}.name: {s.name!r} differs from its key {key!r}")
    train = list(s.train)
    if not train:
        errs.append(f"{p}.train: empty; choose from {TRAINABLE}")
    for t in train:
        if t not in TRAINABLE:
            errs.append(f"{p}.train: unknown entry {t!r}; choose from {TRAINABLE}")
    if train and set(train) <= {"lpips"}:
        errs.append(f"{p}.train: 'lpips' alone trains nothing (add 'vae')")
    if s.epochs <= 0 and s.steps <= 0:
        errs.append(f"{p}: set epochs or steps > 0 (got epochs={s.epochs}, steps={s.steps})")
    if s.epochs < 0 or s.steps < 0:
        errs.append(f"{p}: epochs/steps must be >= 0")
    for f in s.freeze:
        if f not in MODEL_NAMES:
            errs.append(f"{p}.freeze: unknown model {f!r}; choose from {MODEL_NAMES}")
    direct = trained_models(mlc.ConfigDict({"train": tuple(train), "freeze": ()}))
    for f in s.freeze:
        if f in direct:
            errs.append(f"{p}.freeze: {f!r} is frozen but the stage trains it (train={train})")
    groups = optimizer_groups(s) if not errs else []
    for g in s.optimizers:
        if g not in OPT_GROUPS:
            errs.append(f"{p}.optimizers.{g}: unknown group; choose from {OPT_GROUPS}")
        elif groups and g not in groups:
            errs.append(f"{p}.optimizers.{g}: the stage does not train this group "
                        f"(trained groups: {groups})")
    for g in s.schedulers:
        if g not in OPT_GROUPS:
            errs.append(f"{p}.schedulers.{g}: unknown group; choose from {OPT_GROUPS}")
        elif groups and g not in groups:
            errs.append(f"{p}.schedulers.{g}: no optimizer group {g!r} in this stage")
    for g in groups:
        opt_cfg = stage_optimizer(s, g)
        try:
            optim.make_optimizer(opt_cfg, stage_scheduler(s, g), int(s.steps) if s.steps else 10**9,
                                 name=f"{p}.optimizers.{g}")
        except (ValueError, KeyError, TypeError) as e:
            errs.append(f"{p}.optimizers.{g}/schedulers.{g}: {e}")
    ds = dataset_name(config, s)
    if not ds:
        errs.append(f"{p}.dataset: no dataset and no default_dataset")
    elif ds not in config.datasets:
        errs.append(f"{p}.dataset: {ds!r} not in datasets {sorted(config.datasets)}")
    if s.batch_size < 0:
        errs.append(f"{p}.batch_size: must be >= 0 (0 = config.batch_size)")
    if s.grad_accum < 1:
        errs.append(f"{p}.grad_accum: must be >= 1, got {s.grad_accum}")
    if not 0.0 <= s.ema_decay < 1.0:
        errs.append(f"{p}.ema_decay: must be in [0, 1), got {s.ema_decay}")
    known_metrics = sorted(logged_metrics(s)) if not errs else []
    if s.stop_metric and known_metrics and s.stop_metric not in known_metrics:
        errs.append(f"{p}.stop_metric: {s.stop_metric!r} is not logged by this stage; "
                    f"choose from {known_metrics}")
    for g in groups:
        sch = stage_scheduler(s, g)
        if sch and sch.get("type") == "ReduceLROnPlateau" and known_metrics:
            metric = sch.get("metric") or schedules.DEFAULT_PLATEAU_METRIC[g]
            if metric not in known_metrics:
                errs.append(f"{p}.schedulers.{g}.metric: {metric!r} is not logged by this stage; "
                            f"choose from {known_metrics}")
    if s.stop_mode not in STOP_MODES:
        errs.append(f"{p}.stop_mode: {s.stop_mode!r} not in {STOP_MODES}")
    if s.stop_window <= 0:
        errs.append(f"{p}.stop_window: must be > 0, got {s.stop_window}")
    loss = s.loss
    errs += losses.loss_errors(loss, prefix=f"{p}.loss")
    if "lpips" in train and loss.lpips_weights and not Path(loss.lpips_weights).is_file():
        errs.append(f"{p}.loss.lpips_weights: {loss.lpips_weights!r} is not a file")
    if s.latent_cache and (step_kinds(s) != ["flow"] or {"compressor", "expander"} &
                           trained_models(s)):
        errs.append(f"{p}.latent_cache: only a flow stage with a frozen VAE can train from "
                    f"cached latents (train={train})")
    if s.sampler and s.sampler not in cd.SAMPLERS:
        errs.append(f"{p}.sampler: {s.sampler!r} not in {cd.SAMPLERS} ('' = the one "
                    "matching loss.objective)")
    if "flow" in train and s.sample_steps <= 0:
        errs.append(f"{p}.sample_steps: must be > 0")
    return errs + _validate_lora(config, p, s)


def _validate_lora(config: Mapping, p: str, s: Mapping) -> list[str]:
    """A ``lora`` block belongs to a stage with ``'lora'`` in ``train`` and the other way round;
    the adapters need the base flow model frozen and, for DOP, captions the step can rewrite."""
    train = list(s.train)
    block = s.get("lora")
    if "lora" not in train:
        return ([(f"{p}.lora: the stage does not train 'lora' (train={train}); add 'lora' to "
                  "train or remove the block")] if block is not None else [])
    if block is None:
        return [(f"{p}.lora: missing; a stage with 'lora' in train needs its lora block "
                 "(config_defaults.lora_config(trigger=...))")]
    errs = lora.config_errors(block, f"{p}.lora")
    if "flow" in train or "text_encoder" in train:
        errs.append(f"{p}.train: 'lora' trains adapters over a frozen base; remove "
                    f"{[t for t in train if t in ('flow', 'text_encoder')]}")
    cfg = lora.settings(block)
    if float(cfg["dop_multiplier"]) > 0 and s.latent_cache:
        errs.append(f"{p}.latent_cache: DOP (lora.dop_multiplier > 0) rewrites the captions, so "
                    "the stage needs token ids, not a latent/text cache")
    ds = config.datasets.get(dataset_name(config, s)) if dataset_name(config, s) else None
    trigger = str(cfg["trigger"]).strip()
    cap = ds.get("captions_file") if ds is not None else ""
    if trigger and cap and Path(cap).is_file():
        text = Path(cap).read_text(encoding="utf-8", errors="replace")
        if not lora.has_word(text, trigger):
            errs.append(f"{p}.lora.trigger: no caption in {cap} contains {trigger!r}; put the "
                        "trigger word in the captions of the images it should mean")
    return errs


def stage_optimizer(stage: Mapping, group: str) -> dict:
    """The stage's optimizer config for a group, or the reference default for that group."""
    if group in stage.optimizers:
        return dict(stage.optimizers[group])
    return dict(optim.default_optimizer_config(group))


def stage_scheduler(stage: Mapping, group: str) -> dict | None:
    """Only explicitly configured schedules (the reference's rule); None = constant lr."""
    return dict(stage.schedulers[group]) if group in stage.schedulers else None


# ----------------------------------------------------------------------------------------------
# The plan (--validate)
# ----------------------------------------------------------------------------------------------

def describe_plan(config: Mapping) -> str:
    """Human-readable stage plan: models trained/frozen, optimizers, schedules, durations, data, devices."""
    n_dev = jax.device_count()
    lines = ["PIPELINE PLAN",
             (f"  devices: {n_dev} x {jax.devices()[0].platform} over {jax.process_count()} host(s); "
             f"mesh {tuple(tuple(a) for a in config.mesh)}"),
             (f"  model: vae_dim={config.model.vae_dim} flow_dim={config.model.flow_dim} "
             f"flow_layers={config.model.flow_layers} text_dim={config.model.text_embedding_dim} "
             f"activation={config.model.activation} dtype={config.model.dtype}"),
             f"  init_from: {config.init_from or '(none: new models are created)'}"]
    for i, name in enumerate(config.stage_order, 1):
        s = config.stages[name]
        bs = s.batch_size or config.batch_size
        per_dev = bs / n_dev
        dur = []
        if s.steps:
            dur.append(f"{s.steps} steps")
        if s.epochs:
            dur.append(f"{s.epochs} epochs")
        lines.append(f"Stage {i}/{len(config.stage_order)}: {name}" +
                     (f" - {s.description}" if s.description else ""))
        lines.append(f"  trains: {sorted(trained_models(s)) or '-'}  (train={list(s.train)})")
        frozen = sorted(needed_models(s) - trained_models(s))
        lines.append(f"  frozen: {frozen or '-'}")
        lines.append(f"  steps per iteration: {' -> '.join(step_kinds(s))}")
        if "lora" in s.train and s.get("lora") is not None:
            lc = lora.settings(s.lora.to_dict())
            dop = (f"DOP x{lc['dop_multiplier']} every {lc['dop_every_n_steps']} step(s), "
                   f"'{lc['trigger']}' -> '{lc['class_word']}'" if lc["dop_multiplier"] else "no DOP")
            lines.append(f"  LoRA: rank {lc['rank']}, alpha {lc['alpha']}, {lc['target_layers']} "
                         f"layers of the frozen flow model, trigger '{lc['trigger']}', {dop}")
        for g in optimizer_groups(s):
            o = stage_optimizer(s, g)
            sch = stage_scheduler(s, g)
            extra = {k: v for k, v in o.items() if k not in ("type", "lr")}
            lines.append(f"  optimizer {g}: {o.get('type')} lr={o.get('lr')} {extra or ''}".rstrip())
            lines.append(f"  schedule  {g}: {dict(sch) if sch else 'constant'}")
        lines.append(f"  duration: {' / '.join(dur)} (whichever ends first)" if len(dur) == 2
                     else f"  duration: {dur[0] if dur else '?'}")
        ds = dataset_name(config, s)
        dcfg = config.datasets.get(ds) if ds in config.datasets else None
        lines.append(f"  dataset: {ds} ({dcfg.type if dcfg else '?'})")
        lines.append(f"  batch: global {bs}, per device {per_dev:g}, grad_accum {s.grad_accum}")
        if s.stop_metric:
            lines.append(f"  stop when mean of last {s.stop_window} '{s.stop_metric}' is "
                         f"{s.stop_mode} {s.stop_threshold}")
        if s.ema_decay:
            lines.append(f"  EMA decay {s.ema_decay} (used for samples and export)")
        if s.latent_cache:
            lines.append("  data: cached latents of the frozen VAE (built on first use)")
        if "flow" in s.train:
            lines.append(f"  objective: {s.loss.objective}, t-sampling {s.loss.timestep_sampling}, "
                         f"cfg dropout {s.loss.cfg_dropout_prob}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Against an existing workdir: what cannot change under a run in progress
# ----------------------------------------------------------------------------------------------

def resume_errors(config: Mapping, workdir: Path) -> list[str]:
    """Changes that an existing workdir cannot resume with, each with its key and the fix.

    The models of a run are fixed once a stage has started (its checkpoints and the param files
    hand-offs have those shapes); a stage in progress keeps its global batch (the data position
    counts global batches).
    """
    old_path = Path(workdir) / "config.json"
    if not old_path.exists():
        return []
    try:
        old = json.loads(old_path.read_text())
    except ValueError:
        return []  # a damaged copy of the config is rewritten at start; nothing to compare
    errs = []
    fix = "restore the old value or train in a new --workdir"
    new_model, old_model = _flat(config.model.to_dict()), _flat(old.get("model", {}))
    for k in sorted(set(new_model) | set(old_model)):
        if k in old_model and new_model.get(k) != old_model[k]:
            errs.append(f"model.{k}: {new_model.get(k)!r} differs from {old_model[k]!r} of the "
                        f"run in {workdir}; {fix}")
    for name in config.stage_order:
        if not (Path(workdir) / "checkpoints" / name).exists() or name not in old.get("stages", {}):
            continue
        s, o = config.stages[name], old["stages"][name]
        was = o.get("batch_size") or old.get("batch_size")
        now = s.batch_size or config.batch_size
        if was and now != was:
            errs.append(f"stages.{name}.batch_size: global batch {now} differs from {was} of the "
                        f"stage in progress in {workdir}; {fix}")
    return errs


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out

