"""Parity checks of the training engine: optimizers, schedulers, losses (REFERENCE.md 2 and 4).

Trajectories (optimizer params per step, lr per step) must match to 1e-6 relative
(``max|ours - ref| <= 1e-6 * max(1, max|ref|)`` for params, elementwise relative for rates);
loss values to 1e-6 relative.
"""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
from parity_utils import assert_close_ref, load_case

from fluxflow_jax import losses, optim, schedules

REL = 1e-6


def _assert_rel(ours, ref, name: str) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    err = np.abs(ours - ref)
    bad = err > REL * np.abs(ref) + 1e-30
    worst = float(np.max(err / np.maximum(np.abs(ref), 1e-30)))
    assert not bad.any(), f"{name}: relative error {worst:.3e} > {REL} at index {int(np.argmax(bad))}"


def check_optimizers(case: Path) -> None:
    cfg, io, _ = load_case(case)
    grads = io["grads"]
    assert cfg["kwargs"], f"{case}: no optimizer configs"
    for name, opt_cfg in cfg["kwargs"].items():
        # The fixture runs the bare torch optimizers: no clipping, constant lr.
        tx = optim.make_optimizer(dict(opt_cfg, clip_norm=None), None, len(grads),
                                  name=f"optimizers.{name}")
        p = jnp.asarray(io["param_init"])
        state = tx.init(p)
        ref = io[f"{name}.params"]
        for i in range(len(grads)):
            u, state = tx.update(jnp.asarray(grads[i]), state, p)
            p = optax.apply_updates(p, u)
            assert_close_ref(p, ref[i], f"{name} step {i}", rel=REL)


def check_schedulers(case: Path) -> None:
    cfg, io, _ = load_case(case)
    kw = cfg["kwargs"]
    base_lr, total = kw["base_lr"], kw["total_steps"]
    for name, sched_cfg in kw["configs"].items():
        ref = io[f"{name}.lr"]
        if sched_cfg["type"] == "ReduceLROnPlateau":
            ctl = schedules.make_plateau_controller(sched_cfg, base_lr, total,
                                                name=f"schedulers.{name}")
            assert ctl is not None
            # Through the optimizer state, as the training loop applies it.
            tx = optim.make_optimizer({"type": "SGD", "lr": base_lr}, sched_cfg, total,
                                      name=f"optimizers.{name}")
            state = tx.init(jnp.zeros(3))
            ours = []
            for metric in io[f"{name}.metric"]:  # lr[i] is the rate before reporting metric[i]
                ours.append(float(optim.learning_rates(state)["default"]))
                state = optim.set_lr_scale(state, ctl.update(float(metric)))
            _assert_rel(ours, ref, name)
        else:
            sched = schedules.make_schedule(sched_cfg, base_lr, total, name=f"schedulers.{name}")
            _assert_rel([float(sched(i)) for i in range(len(ref))], ref, name)


def check_losses(case: Path) -> None:
    cfg, io, _ = load_case(case)
    mu, logvar = jnp.asarray(io["mu"]), jnp.asarray(io["logvar"])
    kl_keys = [k for k in io if k.startswith("kl_free")]
    assert kl_keys, f"{case}: no KL outputs"
    for key in kl_keys:
        free, norm = key[len("kl_free"):].split("_norm")
        ours = losses.kl_standard_normal(mu, logvar, float(free), bool(int(norm)), "mean")
        _assert_rel(np.reshape(ours, (1,)), io[key], key)
    # Logits are [B, 1, h, w] in the reference; the per-sample mean ignores layout, NHWC anyway.
    real = jnp.asarray(np.moveaxis(io["real_logits"], 1, -1))
    fake = jnp.asarray(np.moveaxis(io["fake_logits"], 1, -1))
    _assert_rel(np.reshape(losses.d_hinge_loss(real, fake), (1,)), io["d_hinge"], "d_hinge")
    _assert_rel(np.reshape(losses.g_hinge_loss(fake), (1,)), io["g_hinge"], "g_hinge")
    w = cfg["kwargs"]["kl_beta_warmup"]
    start, rest = w["steps"].split("..")
    stop, step = (int(v) for v in rest.split(" step "))
    steps = np.arange(int(start), stop + 1, step)
    ours = [float(losses.kl_beta(s, w["total_steps"], w["beta_max"])) for s in steps]
    _assert_rel(ours, io["kl_beta_warmup"], "kl_beta_warmup")


CHECKS = {"optimizers": check_optimizers, "schedulers": check_schedulers, "losses": check_losses}
