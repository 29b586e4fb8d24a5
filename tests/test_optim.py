"""Optimizer/schedule factories: validation, groups, accumulation, lr access, EMA, plateau."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fluxflow_jax import optim, schedules
from fluxflow_jax.state import OPT_GROUPS


def _run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


# ---------------------------------------------------------------------------------------------
# validation: every error names its key

OPT_ERRORS = [
    ({"type": "AdamW", "lr": -1.0}, r"optimizers\.vae\.lr must be > 0, got -1\.0"),
    ({"type": "AdamW", "lr": 1e-3, "betas": (0.9, 1.0)}, r"optimizers\.vae\.betas\[1\] must be in \[0, 1\)"),
    ({"type": "Lion", "lr": 1e-3, "betas": (0.9, 0.9, 0.9)}, r"optimizers\.vae\.betas must be 2 values"),
    ({"type": "Adam", "lr": 1e-3, "eps": 0.0}, r"optimizers\.vae\.eps must be > 0"),
    ({"type": "SGD", "lr": 1e-3, "momentum": 1.0}, r"optimizers\.vae\.momentum must be in \[0, 1\)"),
    ({"type": "RMSprop", "lr": 1e-3, "alpha": 0.0}, r"optimizers\.vae\.alpha must be in \(0, 1\]"),
    ({"type": "AdamW", "lr": 1e-3, "weight_decay": -0.1}, r"optimizers\.vae\.weight_decay must be >= 0"),
    ({"type": "Adagrad", "lr": 1e-3}, r"optimizers\.vae\.type: unsupported optimizer 'Adagrad'"),
    ({"type": "AdamW", "lrr": 1e-3}, r"optimizers\.vae\.lrr is not a setting of AdamW"),
    ({"type": "AdamW", "lr": 1e-3, "momentum": 0.9}, r"optimizers\.vae\.momentum is not a setting"),
    ({"type": "SGD", "lr": 1e-3, "nesterov": True}, r"optimizers\.vae\.nesterov must be used with"),
    ({"type": "AdamW", "lr": 1e-3, "amsgrad": "yes"}, r"optimizers\.vae\.amsgrad must be a bool"),
    ({"type": "AdamW", "lr": 1e-3, "clip_norm": -1.0}, r"optimizers\.vae\.clip_norm must be None or >= 0"),
    ({"type": "SGD", "lr": 1e-3, "momentum": 0.5, "dampening": 2.0}, r"optimizers\.vae\.dampening"),
]


@pytest.mark.parametrize("cfg,msg", OPT_ERRORS, ids=[m for _, m in OPT_ERRORS])
def test_optimizer_validation_names_key(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        optim.make_optimizer(cfg, None, 10, name="optimizers.vae")


SCHED_ERRORS = [
    ({"type": "CosineAnnealingLR", "eta_min_factor": 0.0}, r"schedulers\.flow\.eta_min_factor must be in \(0, 1\]"),
    ({"type": "CosineAnnealingLR", "eta_min_factor": 1.5}, r"schedulers\.flow\.eta_min_factor"),
    ({"type": "ExponentialLR", "gamma": 1.0}, r"schedulers\.flow\.gamma must be in \(0, 1\)"),
    ({"type": "StepLR", "gamma": 0.5, "step_size": 0}, r"schedulers\.flow\.step_size must be an int > 0"),
    ({"type": "LinearLR", "start_factor": 0.0}, r"schedulers\.flow\.start_factor must be in \(0, 1\]"),
    ({"type": "LinearLR", "end_factor": -1.0}, r"schedulers\.flow\.end_factor"),
    ({"type": "ConstantLR", "factor": 0.0}, r"schedulers\.flow\.factor must be in \(0, 1\]"),
    ({"type": "ReduceLROnPlateau", "factor": 1.0}, r"schedulers\.flow\.factor must be in \(0, 1\)"),
    ({"type": "ReduceLROnPlateau", "patience": -1}, r"schedulers\.flow\.patience must be an int >= 0"),
    ({"type": "ReduceLROnPlateau", "mode": "up"}, r"schedulers\.flow\.mode"),
    ({"type": "MultiStepLR"}, r"schedulers\.flow\.type: unsupported scheduler 'MultiStepLR'"),
    ({"type": "CosineAnnealingLR", "T_max": 10}, r"schedulers\.flow\.T_max is not a setting"),
    ({"type": "CosineAnnealingLR", "warmup_steps": 10}, r"schedulers\.flow\.warmup_steps must be an int in \[0, total_steps=10\)"),
    ({"type": "CosineAnnealingLR", "warmup_start_factor": 2.0}, r"schedulers\.flow\.warmup_start_factor"),
]


@pytest.mark.parametrize("cfg,msg", SCHED_ERRORS, ids=[m for _, m in SCHED_ERRORS])
def test_schedule_validation_names_key(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        schedules.make_schedule(cfg, 1e-3, 10, name="schedulers.flow")


def test_total_steps_must_be_positive():
    for cfg in (None, {"type": "CosineAnnealingLR"}):
        with pytest.raises(ValueError, match=r"schedulers\.vae: total_steps must be an int > 0"):
            schedules.make_schedule(cfg, 1e-3, 0)


def test_scheduler_errors_reach_through_make_optimizer():
    with pytest.raises(ValueError, match=r"schedulers\.flow\.gamma"):
        optim.make_optimizer({"type": "Lion", "lr": 1e-4}, {"type": "ExponentialLR", "gamma": 2.0},
                             10, name="optimizers.flow")


# ---------------------------------------------------------------------------------------------
# defaults


def test_reference_defaults():
    assert optim.default_optimizer_config("flow") == {
        "type": "Lion", "lr": 5e-7, "betas": (0.9, 0.95), "weight_decay": 0.01,
        "decoupled_weight_decay": True, "clip_norm": 1.0}
    assert optim.default_optimizer_config("discriminator")["amsgrad"] is True
    assert optim.default_optimizer_config("discriminator")["betas"] == (0.0, 0.9)
    assert optim.default_optimizer_config("text_encoder")["lr"] == 5e-8
    assert optim.default_optimizer_config("text_encoder")["clip_norm"] is None
    assert schedules.default_scheduler_config("text_encoder")["eta_min_factor"] == 0.001
    assert schedules.default_scheduler_config("vae") == {"type": "CosineAnnealingLR", "eta_min_factor": 0.1}
    # fresh copies
    optim.default_optimizer_config("vae")["lr"] = 1.0
    assert optim.default_optimizer_config("vae")["lr"] == 5e-7
    with pytest.raises(ValueError, match="unknown optimizer group 'unet'"):
        optim.default_optimizer_config("unet")
    for g in OPT_GROUPS:  # every default builds and steps
        tx = optim.make_optimizer(optim.default_optimizer_config(g), schedules.default_scheduler_config(g),
                                  100, name=f"optimizers.{g}")
        p, _ = _run(tx, jnp.ones(4), [jnp.full(4, 0.5)])
        assert np.all(np.asarray(p) < 1.0)


# ---------------------------------------------------------------------------------------------
# torch semantics beyond the fixture


def test_clipping_is_torch_clip_grad_norm_and_group_default():
    g = jnp.array([3.0, 4.0])  # norm 5
    sgd = {"type": "SGD", "lr": 1.0}
    p, _ = _run(optim.make_optimizer(sgd, None, 5, name="optimizers.vae"), jnp.zeros(2), [g])
    np.testing.assert_allclose(np.asarray(p), -np.asarray(g) * 1.0 / (5.0 + 1e-6), rtol=1e-6)
    p, _ = _run(optim.make_optimizer(sgd, None, 5, name="optimizers.discriminator"), jnp.zeros(2), [g])
    np.testing.assert_array_equal(np.asarray(p), -np.asarray(g))  # D is not clipped by default
    p, _ = _run(optim.make_optimizer(dict(sgd, clip_norm=10.0), None, 5), jnp.zeros(2), [g])
    np.testing.assert_array_equal(np.asarray(p), -np.asarray(g))  # coefficient clamped at 1
    # where torch's +1e-6 matters: norm 5e-6, max 1e-6 -> coefficient 1/6 (optax's would be 1/5)
    p, _ = _run(optim.make_optimizer(dict(sgd, clip_norm=1e-6), None, 5), jnp.zeros(2), [g * 1e-6])
    np.testing.assert_allclose(np.asarray(p), -np.asarray(g) * 1e-6 / 6.0, rtol=1e-5)
    p, _ = _run(optim.make_optimizer(dict(sgd, clip_norm=0), None, 5), jnp.zeros(2), [g * 100])
    np.testing.assert_array_equal(np.asarray(p), -np.asarray(g) * 100)


def _torch_sgd_reference(p, grads, lr, momentum, dampening, nesterov, wd):
    """torch.optim.SGD's documented update, in numpy float64."""
    p = np.array(p, np.float64)
    buf = None
    for g in grads:
        g = np.asarray(g, np.float64) + wd * p
        buf = g.copy() if buf is None else momentum * buf + (1 - dampening) * g
        d = g + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def test_sgd_dampening_matches_torch_rule():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=6).astype(np.float32)
    grads = rng.normal(size=(5, 6)).astype(np.float32)
    cfg = {"type": "SGD", "lr": 0.1, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01,
           "clip_norm": None}
    p, _ = _run(optim.make_optimizer(cfg, None, 5), jnp.asarray(p0), list(jnp.asarray(grads)))
    ref = _torch_sgd_reference(p0, grads, 0.1, 0.8, 0.3, False, 0.01)
    np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-5, atol=1e-6)


def test_lion_coupled_decay_when_not_decoupled():
    cfg = {"type": "Lion", "lr": 0.1, "weight_decay": 0.5, "decoupled_weight_decay": False,
           "clip_norm": None}
    p, _ = _run(optim.make_optimizer(cfg, None, 5), jnp.array([2.0, -2.0]), [jnp.array([1.0, 1.0])])
    # lion_pytorch: p *= 1 - lr*wd; p -= lr*sign(update)
    np.testing.assert_allclose(np.asarray(p), [2.0 * 0.95 - 0.1, -2.0 * 0.95 - 0.1], rtol=1e-6)
    cfg["decoupled_weight_decay"] = True  # wd / lr0: 1 - 0.5 at lr0
    p, _ = _run(optim.make_optimizer(cfg, None, 5), jnp.array([2.0, -2.0]), [jnp.array([1.0, 1.0])])
    np.testing.assert_allclose(np.asarray(p), [2.0 * 0.5 - 0.1, -2.0 * 0.5 - 0.1], rtol=1e-6)


def test_optimizer_runs_under_jit():
    tx = optim.make_optimizer(optim.default_optimizer_config("discriminator"),
                              schedules.default_scheduler_config("discriminator"), 20)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    g = jax.tree.map(jnp.ones_like, params)
    eager_p, eager_s = params, state
    for _ in range(3):
        params, state = step(params, state, g)
        u, eager_s = tx.update(g, eager_s, eager_p)
        eager_p = optax.apply_updates(eager_p, u)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(eager_p)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# groups


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"compressor": {"w": jax.random.normal(k1, (4, 3))},
            "expander": {"w": jnp.ones(5)},
            "discriminator": {"w": jax.random.normal(k2, (6,)), "b": jnp.zeros(2)}}


def test_frozen_group_bit_identical_and_stateless():
    params = _params()
    labels = optim.param_labels(params, {"compressor": "vae", "expander": "vae",
                                         "discriminator": "discriminator"})
    assert labels["discriminator"] == {"w": "discriminator", "b": "discriminator"}
    tx = optim.make_partitioned({"vae": optim.make_optimizer({"type": "AdamW", "lr": 1e-2}, None, 10),
                                 "discriminator": None}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    new, state = _run(tx, params, [grads] * 3)
    for k in ("w", "b"):
        a = np.asarray(new["discriminator"][k])
        b = np.asarray(params["discriminator"][k])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert not np.allclose(np.asarray(new["compressor"]["w"]), np.asarray(params["compressor"]["w"]))
    assert jax.tree.leaves(state.inner_states["discriminator"]) == []
    assert jax.tree.leaves(state.inner_states["vae"])  # the trained group keeps moments


def test_param_labels_and_partition_errors():
    with pytest.raises(ValueError, match=r"\['discriminator'\] are not covered by any optimizer group"):
        optim.param_labels(_params(), {"compressor": "vae", "expander": "vae"})
    labels = optim.param_labels(_params(), {"compressor": "vae", "expander": "vae",
                                            "discriminator": "disc"})
    with pytest.raises(ValueError, match=r"param labels \['disc'\] have no optimizer"):
        optim.make_partitioned({"vae": optax.sgd(0.1)}, labels)


@pytest.mark.parametrize("kind", ["AdamW", "Lion", "RMSprop"])
def test_multisteps_equals_one_step_on_mean_grad(kind):
    k = 3
    params = {"w": jnp.linspace(-1.0, 1.0, 7)}
    micro = [{"w": jax.random.normal(jax.random.key(i), (7,))} for i in range(k)]
    mean = {"w": sum(g["w"] for g in micro) / k}
    cfg = {"type": kind, "lr": 1e-2}
    sched = {"type": "ExponentialLR", "gamma": 0.5}
    acc = optim.with_accumulation(optim.make_optimizer(cfg, sched, 10), k)
    state = acc.init(params)
    p = params
    for i, g in enumerate(micro):
        u, state = acc.update(g, state, p)
        if i < k - 1:
            assert float(jnp.max(jnp.abs(u["w"]))) == 0.0  # no update mid-accumulation
        p = optax.apply_updates(p, u)
    one, one_state = _run(optim.make_optimizer(cfg, sched, 10), params, [mean])
    np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(one["w"]), rtol=1e-5, atol=1e-7)
    # the schedule counts optimizer updates, not micro-batches
    np.testing.assert_allclose(float(optim.learning_rates(state)["default"]),
                               float(optim.learning_rates(one_state)["default"]), rtol=1e-7)
    assert optim.with_accumulation(optax.sgd(1.0), 1) is not None
    with pytest.raises(ValueError, match="every_k must be an int >= 1"):
        optim.with_accumulation(optax.sgd(1.0), 0)


# ---------------------------------------------------------------------------------------------
# learning rates and schedules


def test_learning_rates_report_scheduled_lr_per_group():
    params = _params()
    labels = optim.param_labels(params, {"compressor": "vae", "expander": "vae",
                                         "discriminator": "discriminator"})
    sched = {"type": "CosineAnnealingLR", "eta_min_factor": 0.1}
    vae_sched = schedules.make_schedule(sched, 1e-3, 10)
    tx = optim.make_partitioned({
        "vae": optim.make_optimizer({"type": "AdamW", "lr": 1e-3}, sched, 10),
        "discriminator": optim.make_optimizer({"type": "AdamW", "lr": 2e-3}, None, 10,
                                              name="optimizers.discriminator")}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    state = tx.init(params)
    lrs = optim.learning_rates(state)
    assert set(lrs) == {"vae", "discriminator"}
    np.testing.assert_allclose(float(lrs["vae"]), 1e-3, rtol=1e-6)
    for k in range(1, 5):
        _, state = tx.update(grads, state, params)
        lrs = optim.learning_rates(state)  # the rate the last (k-th) update used
        np.testing.assert_allclose(float(lrs["vae"]), float(vae_sched(k - 1)), rtol=1e-6)
        np.testing.assert_allclose(float(lrs["discriminator"]), 2e-3, rtol=1e-6)
    state = optim.set_lr_scale(state, 0.25, group="discriminator")
    lrs = optim.learning_rates(state)
    np.testing.assert_allclose(float(lrs["discriminator"]), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lrs["vae"]), float(vae_sched(3)), rtol=1e-6)
    with pytest.raises(ValueError, match="no optimizer group 'flow'"):
        optim.set_lr_scale(state, 0.5, group="flow")


def test_lr_scale_changes_the_update():
    tx = optim.make_optimizer({"type": "SGD", "lr": 0.1, "clip_norm": None}, None, 5)
    state = optim.set_lr_scale(tx.init(jnp.zeros(2)), 0.5)
    u, _ = tx.update(jnp.ones(2), state, jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(u), [-0.05, -0.05], rtol=1e-6)


def test_warmup_shape():
    base, total = 1e-3, 24
    s = schedules.make_schedule({"type": "CosineAnnealingLR", "eta_min_factor": 0.1, "warmup_steps": 4},
                            base, total)
    lr = np.array([float(s(i)) for i in range(total + 1)])
    np.testing.assert_allclose(lr[:5], [0.0, 0.25e-3, 0.5e-3, 0.75e-3, 1e-3], rtol=1e-6, atol=1e-12)
    assert np.all(np.diff(lr[:5]) > 0) and np.all(np.diff(lr[4:]) < 0)
    np.testing.assert_allclose(lr[total], 0.1 * base, rtol=1e-6)  # cosine still ends at total
    s = schedules.make_schedule({"type": "StepLR", "gamma": 0.5, "step_size": 3, "warmup_steps": 2,
                             "warmup_start_factor": 0.1}, base, total)
    lr = [float(s(i)) for i in range(8)]
    np.testing.assert_allclose(lr, [1e-4, 5.5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4], rtol=1e-6)


def test_cosine_rises_again_past_t_max_like_torch():
    s = schedules.make_schedule({"type": "CosineAnnealingLR", "eta_min_factor": 0.1}, 1.0, 10)
    np.testing.assert_allclose(float(s(10)), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(s(15)), float(s(5)), rtol=1e-6)
    np.testing.assert_allclose(float(s(20)), 1.0, rtol=1e-6)


def test_no_scheduler_is_constant_and_defaults_use_total_steps():
    s = schedules.make_schedule(None, 3e-4, 10)
    assert [float(s(i)) for i in (0, 5, 50)] == [pytest.approx(3e-4, rel=1e-7)] * 3
    step = schedules.make_schedule({"type": "StepLR"}, 1.0, 50)  # step_size = 50 // 10, gamma 0.1
    np.testing.assert_allclose([float(step(i)) for i in (4, 5, 10)], [1.0, 0.1, 0.01], rtol=1e-6)
    lin = schedules.make_schedule({"type": "LinearLR"}, 1.0, 50)  # 1.0 -> 0.1 over total_steps
    np.testing.assert_allclose([float(lin(i)) for i in (0, 25, 50, 80)], [1.0, 0.55, 0.1, 0.1],
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# plateau


def test_plateau_controller_behaviour():
    ctl = schedules.PlateauController(factor=0.5, patience=1, cooldown=1, min_lr=0.2, base_lr=1.0)
    scales = [ctl.update(m) for m in [1.0] * 9]
    # best, bad 1, bad 2 > patience (cut, cooldown 1), cooldown resets, bad 1, bad 2 (cut),
    # cooldown, bad 1, bad 2 (cut to min_lr)
    assert scales == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
    up = schedules.PlateauController(factor=0.1, patience=0, mode="max", threshold=0.5,
                                 threshold_mode="abs")
    assert [up.update(m) for m in [1.0, 1.4, 2.0]] == pytest.approx([1.0, 0.1, 0.1])
    # tiny lr changes below eps are ignored, as torch
    tiny = schedules.PlateauController(factor=0.5, patience=0, base_lr=1e-8)
    assert [tiny.update(m) for m in [1.0, 1.0]] == [1.0, 1.0]
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau\.factor must be in \(0, 1\)"):
        schedules.PlateauController(factor=1.5)


def test_plateau_state_roundtrip_is_json_and_exact():
    metrics = [1.0, 0.9, 0.95, 0.97, 0.96, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    full = schedules.PlateauController(factor=0.5, patience=2)
    ref = [full.update(m) for m in metrics]
    a = schedules.PlateauController(factor=0.5, patience=2)
    fresh_state = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    first = [a.update(m) for m in metrics[:4]]
    saved = json.loads(json.dumps(a.state_dict(), allow_nan=False))
    b = schedules.PlateauController(factor=0.5, patience=2)
    b.load_state_dict(saved)
    assert first + [b.update(m) for m in metrics[4:]] == ref
    assert fresh_state["best"] is None
    with pytest.raises(KeyError, match="lacks"):
        b.load_state_dict({"scale": 1.0})


def test_plateau_controller_from_config():
    assert schedules.make_plateau_controller({"type": "CosineAnnealingLR"}, 1e-3, 10) is None
    assert schedules.make_plateau_controller(None, 1e-3, 10) is None
    ctl = schedules.make_plateau_controller({"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0},
                                        1e-3, 10)
    assert [ctl.update(m) for m in (1.0, 2.0)] == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_update_rule_and_warmup():
    ema = {"a": jnp.array([1.0, 2.0]), "n": jnp.array([1], jnp.int32)}
    params = {"a": jnp.array([3.0, -2.0]), "n": jnp.array([7], jnp.int32)}
    out = optim.ema_update(ema, params, 0.9)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    assert int(out["n"][0]) == 7  # non-float leaves follow params
    d = min(0.999, (1 + 5) / (10 + 5))
    out = optim.ema_update(ema, params, 0.999, step=jnp.asarray(5), warmup=True)
    np.testing.assert_allclose(np.asarray(out["a"]), d * np.array([1.0, 2.0]) + (1 - d) * np.array([3.0, -2.0]),
                               rtol=1e-6)
    late = optim.ema_update(ema, params, 0.9, step=10**6, warmup=True)  # warm-up over: plain decay
    np.testing.assert_allclose(np.asarray(late["a"]), np.asarray(optim.ema_update(ema, params, 0.9)["a"]))
    with pytest.raises(ValueError, match="needs step"):
        optim.ema_update(ema, params, 0.9, warmup=True)
    # repeated updates converge to constant params
    e = ema
    for _ in range(200):
        e = optim.ema_update(e, params, 0.9)
    np.testing.assert_allclose(np.asarray(e["a"]), [3.0, -2.0], atol=1e-5)
    assert math.isclose(d, 0.4)
