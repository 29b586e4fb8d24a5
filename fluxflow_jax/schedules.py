"""Learning-rate schedules with torch semantics, and the host-side ReduceLROnPlateau controller.

Each schedule is an optax schedule (lr per optimizer update, count 0 = the first) reproducing
torch's closed forms within ~2e-7 (checked against ``parity/schedulers``); an optional linear
warm-up (an addition) precedes the main schedule. ReduceLROnPlateau cannot be a function of the
step count: the loop feeds it the monitored metric and writes the multiplier into the optimizer
state's ``lr_scale`` (``optim.set_lr_scale``). Also home of the small config-checking helpers the
optimizer factories share (every error names its config key).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fluxflow_jax.state import OPT_GROUPS

_DEFAULT_SCHEDULERS = {
    "flow": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
    "vae": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
    "text_encoder": {"type": "CosineAnnealingLR", "eta_min_factor": 0.001},
    "discriminator": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
    "lora": {"type": "CosineAnnealingLR", "eta_min_factor": 0.1},
}
# Per type: the keys it reads and the defaults the reference's create_optimizer passes.
_SCHEDULER_KEYS = {
    "CosineAnnealingLR": {"eta_min_factor": 0.1},
    "LinearLR": {"start_factor": 1.0, "end_factor": 0.1, "total_iters": None},
    "ExponentialLR": {"gamma": 0.95},
    "ConstantLR": {"factor": 1.0, "total_iters": None},
    "StepLR": {"step_size": None, "gamma": 0.1},
    "ReduceLROnPlateau": {"mode": "min", "factor": 0.1, "patience": 10, "threshold": 1e-4,
                          "threshold_mode": "rel", "cooldown": 0, "min_lr": 0.0,
                          # ours: the logged metric it watches ('' = the group's loss, as the
                          # reference steps it with the loss) and how often (training steps)
                          "metric": "", "step_every": 1},
}
# The loss the reference steps each group's ReduceLROnPlateau with.
DEFAULT_PLATEAU_METRIC = {"vae": "vae_loss", "flow": "flow_loss", "text_encoder": "flow_loss",
                          "discriminator": "discriminator_loss", "lora": "flow_loss"}
_COMMON_SCHEDULER_KEYS = ("type", "warmup_steps", "warmup_start_factor")

def default_scheduler_config(group: str) -> dict:
    """The reference's default scheduler for ``group``: cosine to 0.1 lr0 (text encoder 0.001)."""
    if group not in _DEFAULT_SCHEDULERS:
        raise ValueError(f"unknown scheduler group {group!r}; expected one of {OPT_GROUPS}")
    return copy.deepcopy(_DEFAULT_SCHEDULERS[group])

def settings_with_defaults(cfg: Mapping | None, allowed: Mapping, common: tuple, name: str,
              kind: str) -> dict:
    """Mapping -> dict with defaults filled; unknown keys raise naming them. None = default."""
    cfg = {} if cfg is None else {k: cfg[k] for k in cfg}
    known = set(allowed) | set(common)
    for key in cfg:
        if key not in known:
            raise ValueError(f"{name}.{key} is not a setting of {kind}; "
                             f"allowed keys: {sorted(known)}")
    out = dict(allowed)
    out.update({k: v for k, v in cfg.items() if v is not None})
    return out


def check_setting(ok: bool, name: str, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name}.{key} must be {rule}, got {value!r}")




def _validate_schedule(s: dict, total_steps: int, name: str) -> None:
    kind = s["type"]
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    isint = lambda v: isinstance(v, int) and not isinstance(v, bool)
    w = s.get("warmup_steps", 0)
    check_setting(isint(w) and 0 <= w < total_steps, name, "warmup_steps",
                  f"an int in [0, total_steps={total_steps})", w)
    f0 = s.get("warmup_start_factor", 0.0)
    check_setting(num(f0) and 0 <= f0 <= 1, name, "warmup_start_factor", "in [0, 1]", f0)
    if kind == "CosineAnnealingLR":
        v = s["eta_min_factor"]
        check_setting(num(v) and 0 < v <= 1, name, "eta_min_factor", "in (0, 1]", v)
    if kind in ("ExponentialLR", "StepLR"):
        check_setting(num(s["gamma"]) and 0 < s["gamma"] < 1, name, "gamma", "in (0, 1)", s["gamma"])
    if kind == "StepLR":
        check_setting(isint(s["step_size"]) and s["step_size"] > 0, name, "step_size", "an int > 0",
                      s["step_size"])
    if kind == "LinearLR":  # reference: > 0; torch additionally: <= 1
        for k in ("start_factor", "end_factor"):
            check_setting(num(s[k]) and 0 < s[k] <= 1, name, k, "in (0, 1]", s[k])
        check_setting(isint(s["total_iters"]) and s["total_iters"] > 0, name, "total_iters", "an int > 0",
                      s["total_iters"])
    if kind == "ConstantLR":
        check_setting(num(s["factor"]) and 0 < s["factor"] <= 1, name, "factor", "in (0, 1]", s["factor"])
        check_setting(isint(s["total_iters"]) and s["total_iters"] >= 0, name, "total_iters",
                      "an int >= 0", s["total_iters"])
    if kind == "ReduceLROnPlateau":
        check_setting(num(s["factor"]) and 0 < s["factor"] < 1, name, "factor", "in (0, 1)", s["factor"])
        check_setting(isint(s["patience"]) and s["patience"] >= 0, name, "patience", "an int >= 0",
                      s["patience"])
        check_setting(s["mode"] in ("min", "max"), name, "mode", "'min' or 'max'", s["mode"])
        check_setting(s["threshold_mode"] in ("rel", "abs"), name, "threshold_mode", "'rel' or 'abs'",
                      s["threshold_mode"])
        check_setting(num(s["threshold"]) and s["threshold"] >= 0, name, "threshold", ">= 0",
                      s["threshold"])
        check_setting(isint(s["cooldown"]) and s["cooldown"] >= 0, name, "cooldown", "an int >= 0",
                      s["cooldown"])
        check_setting(num(s["min_lr"]) and s["min_lr"] >= 0, name, "min_lr", ">= 0", s["min_lr"])
        if "step_every" in s:
            check_setting(isint(s["step_every"]) and s["step_every"] >= 1, name, "step_every",
                          "an int >= 1", s["step_every"])
            check_setting(isinstance(s["metric"], str), name, "metric", "a metric name", s["metric"])


def _lr_fn(s: dict, steps: int, lr0: float) -> Callable[[jax.Array], jax.Array]:
    """lr at (float32) step t, torch's closed forms.

    The constants are folded in float64 on the host and each form is written without
    cancellation, so float32 evaluation stays within ~2e-7 of torch's float64 rates.
    """
    kind = s["type"]
    if kind == "CosineAnnealingLR":  # torch's recursion == this closed form, periodic past T_max
        eta = s["eta_min_factor"]
        lo, amp, w = lr0 * eta, lr0 * (1 - eta), math.pi / (2 * steps)
        return lambda t: lo + amp * jnp.square(jnp.cos(w * t))  # (1 + cos x) / 2 = cos^2(x / 2)
    if kind == "LinearLR":
        a, b, n = s["start_factor"], s["end_factor"], s["total_iters"]
        ca, cb = lr0 * a / n, lr0 * b / n
        return lambda t: ca * (n - jnp.minimum(t, n)) + cb * jnp.minimum(t, n)
    # gamma ** k as exp(k * log gamma) with log gamma taken in float64: float32(gamma) itself is
    # off by up to 3e-8 relative, which k multiplies (0.9 ** 34 would be 9e-7 off).
    if kind == "ExponentialLR":
        lg = math.log(s["gamma"])
        return lambda t: lr0 * jnp.exp(t * lg)
    if kind == "ConstantLR":
        return lambda t: jnp.where(t < s["total_iters"], lr0 * s["factor"], lr0)
    if kind == "StepLR":
        lg, inv = math.log(s["gamma"]), 1.0 / s["step_size"]
        # floor((t + 0.5) / k): XLA's division is not correctly rounded, t / k could land below
        # an exact multiple.
        return lambda t: lr0 * jnp.exp(jnp.floor((t + 0.5) * inv) * lg)
    return lambda t: jnp.full_like(t, lr0)  # ReduceLROnPlateau: host-fed through lr_scale


def _scheduler_settings(sched_cfg: Mapping | None, total_steps: int, name: str) -> dict:
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise ValueError(f"{name}: total_steps must be an int > 0, got {total_steps!r}")
    cfg = {k: sched_cfg[k] for k in sched_cfg}
    kind = cfg.get("type") or "CosineAnnealingLR"
    if kind not in _SCHEDULER_KEYS:
        raise ValueError(f"{name}.type: unsupported scheduler {kind!r}; "
                         f"supported: {sorted(_SCHEDULER_KEYS)}")
    s = settings_with_defaults(cfg, _SCHEDULER_KEYS[kind], _COMMON_SCHEDULER_KEYS, name, kind)
    s["type"] = kind
    return s


def make_schedule(sched_cfg: Mapping | None, base_lr: float, total_steps: int, *,
                  name: str = "schedulers.vae") -> optax.Schedule:
    """lr per optimizer step (count 0 = the first update), torch semantics.

    ``sched_cfg=None`` means a constant lr (the reference crashes there, section 10 item 6).
    ``warmup_steps`` W (an addition) ramps linearly from ``warmup_start_factor`` (default 0)
    * lr0 at step 0 towards lr0; the main schedule then runs on ``t - W`` with
    ``total_steps - W`` steps, so cosine still ends at ``total_steps``. Defaults that depend on
    the step count (LinearLR/ConstantLR ``total_iters``, StepLR ``step_size = steps // 10``) use
    that main length. Cosine keeps torch's behaviour past T_max (it rises again, period 2 T_max).
    """
    if sched_cfg is None:
        if not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"{name}: total_steps must be an int > 0, got {total_steps!r}")
        return lambda count: jnp.full((), base_lr, jnp.float32) + 0.0 * count
    s = _scheduler_settings(sched_cfg, total_steps, name)
    _validate_schedule(dict(s, type="warmup only"), total_steps, name)
    warm = s.get("warmup_steps", 0)
    main_steps = total_steps - warm
    for k, default in (("total_iters", main_steps), ("step_size", main_steps // 10)):
        if k in s and s[k] is None:
            s[k] = default
    _validate_schedule(s, total_steps, name)
    main = _lr_fn(s, main_steps, float(base_lr))
    f0 = float(s.get("warmup_start_factor", 0.0))
    w0, w1 = base_lr * f0, (base_lr * (1 - f0) / warm) if warm else 0.0

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        lr = main(jnp.maximum(t - warm, 0.0))
        if warm:
            lr = jnp.where(t < warm, w0 + w1 * t, lr)
        return lr.astype(jnp.float32)

    return schedule


class PlateauController:
    """Host-side ReduceLROnPlateau (torch semantics) producing a multiplier for ``lr_scale``.

    Call ``update(metric)`` once per scheduler step with the monitored value; it returns the new
    scale (lr = schedule(t) * scale). ``base_lr`` lets ``min_lr`` and torch's ``eps`` (an lr change
    smaller than eps is ignored) be compared in lr units.
    """

    def __init__(self, factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                 mode: str = "min", threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float = 0.0, base_lr: float = 1.0, eps: float = 1e-8):
        s = {"type": "ReduceLROnPlateau", "factor": factor, "patience": patience,
             "threshold": threshold, "mode": mode, "threshold_mode": threshold_mode,
             "cooldown": cooldown, "min_lr": min_lr}
        _validate_schedule(s, 1, "ReduceLROnPlateau")
        if not base_lr > 0:
            raise ValueError(f"ReduceLROnPlateau.base_lr must be > 0, got {base_lr!r}")
        self.factor, self.patience, self.threshold = float(factor), int(patience), float(threshold)
        self.mode, self.threshold_mode, self.cooldown = mode, threshold_mode, int(cooldown)
        self.min_lr, self.base_lr, self.eps = float(min_lr), float(base_lr), float(eps)
        self.scale, self.best, self.num_bad, self.cooldown_counter, self.steps = 1.0, None, 0, 0, 0

    def _better(self, a: float) -> bool:
        if self.best is None:
            return not math.isnan(a)
        b, th = self.best, self.threshold
        if self.mode == "min":
            return a < (b * (1 - th) if self.threshold_mode == "rel" else b - th)
        return a > (b * (1 + th) if self.threshold_mode == "rel" else b + th)

    def update(self, metric: float) -> float:
        """Report the monitored value; returns the lr scale for the next steps."""
        current = float(metric)
        self.steps += 1
        if self._better(current):
            self.best, self.num_bad = current, 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.patience:
            old = self.scale * self.base_lr
            new = max(old * self.factor, self.min_lr)
            if old - new > self.eps:
                self.scale = new / self.base_lr
            self.cooldown_counter, self.num_bad = self.cooldown, 0
        return self.scale

    def state_dict(self) -> dict:
        """JSON-able state (no inf/nan: ``best`` is None before the first finite metric)."""
        return {"scale": self.scale, "best": self.best, "num_bad_epochs": self.num_bad,
                "cooldown_counter": self.cooldown_counter, "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"scale", "best", "num_bad_epochs", "cooldown_counter", "steps"} - set(state)
        if missing:
            raise KeyError(f"plateau controller state lacks {sorted(missing)}")
        self.scale = float(state["scale"])
        self.best = None if state["best"] is None else float(state["best"])
        self.num_bad, self.steps = int(state["num_bad_epochs"]), int(state["steps"])
        self.cooldown_counter = int(state["cooldown_counter"])


def make_plateau_controller(sched_cfg: Mapping | None, base_lr: float, total_steps: int, *,
                            name: str = "schedulers.vae") -> PlateauController | None:
    """A PlateauController for a ReduceLROnPlateau config, None for any other scheduler."""
    if sched_cfg is None or (sched_cfg.get("type") or "CosineAnnealingLR") != "ReduceLROnPlateau":
        return None
    s = _scheduler_settings(sched_cfg, total_steps, name)
    _validate_schedule(s, total_steps, name)
    return PlateauController(s["factor"], s["patience"], s["threshold"], s["mode"],
                             s["threshold_mode"], s["cooldown"], s["min_lr"], base_lr=base_lr)


class PlateauDriver:
    """The ReduceLROnPlateau groups of a stage, stepped by the training loop.

    Each entry watches one logged metric (``schedulers.<group>.metric``, default the group's loss)
    and is stepped every ``step_every`` training steps with its latest value; the loop writes the
    returned scales into the optimizer state (``optim.set_lr_scale``) and keeps ``state_dict()`` in
    the checkpoint, so a resumed run continues the same plateau bookkeeping.
    """

    def __init__(self, entries: Mapping[str, tuple[PlateauController, str, int]]):
        self.entries = dict(entries)  # group -> (controller, metric, step_every)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def due(self, step: int) -> bool:
        return any(step % every == 0 for _, _, every in self.entries.values())

    def update(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
        """Step the due controllers; returns ``{group: lr scale}`` for those whose scale changed."""
        changed = {}
        for group, (ctl, metric, every) in self.entries.items():
            if step % every or metric not in values:
                continue
            old = ctl.scale
            if ctl.update(values[metric]) != old:
                changed[group] = ctl.scale
        return changed

    def state_dict(self) -> dict:
        return {g: ctl.state_dict() for g, (ctl, _, _) in self.entries.items()}

    def load_state_dict(self, state: Mapping) -> None:
        for g, (ctl, _, _) in self.entries.items():
            if g in state:
                ctl.load_state_dict(state[g])


def make_plateau_driver(groups: Mapping[str, tuple[Mapping | None, float]], total_steps: int,
                        prefix: str) -> PlateauDriver:
    """``groups``: ``{group: (scheduler config, base lr)}``; only ReduceLROnPlateau ones count."""
    entries = {}
    for g, (cfg, lr) in groups.items():
        ctl = make_plateau_controller(cfg, lr, total_steps, name=f"{prefix}.{g}")
        if ctl is not None:
            metric = cfg.get("metric") or DEFAULT_PLATEAU_METRIC[g]
            entries[g] = (ctl, metric, int(cfg.get("step_every") or 1))
    return PlateauDriver(entries)

