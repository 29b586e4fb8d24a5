"""Sharded train steps equal single-device ones: 8-way data parallel and FSDP (8 CPU devices).

XLA_FLAGS must be set before jax initialises its backend, and the pytest process keeps its one
device, so the check runs this file as a script in a subprocess with
``--xla_force_host_platform_device_count=8`` and reports the largest differences as JSON.

What the child does: from one initial state it runs D step -> VAE step (GAN on) -> flow step
(text encoder trained) on a 1-device mesh, on an 8-way ``data`` mesh, and the VAE step on a
``data=2 x fsdp=4`` mesh with every divisible parameter and optimizer moment sharded; it compares
every leaf of the new states (params, opt states, EMA, spectral stats, loss windows) and the
metrics with the single-device run (``allclose(rtol=1e-5, atol=1e-5)``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from run_utils import xla_flags  # the tests' folder is on the path, as a script too

MARK = "MULTIDEVICE_RESULT "


def test_sharded_steps_match_single_device():
    # the suite's flags (LLVM at -O0): the single-device and sharded steps compile alike
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env,
                          capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)][-1]
    res = json.loads(line[len(MARK):])
    assert res["n_devices"] == 8
    assert res["fsdp_sharded_leaves"] > 10, res  # FSDP really sharded the state
    print({k: r["max_abs_diff"] for k, r in res["compare"].items()})
    for name, r in res["compare"].items():
        assert r["mismatched"] == [], (name, r)
        assert r["n_leaves"] > 50, (name, r)


# ----------------------------------------------------------------------------------------------
# child process


def _child() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fluxflow_jax import optim, sharding, steps
    from fluxflow_jax.models import registry
    from fluxflow_jax.state import create_train_state

    sys.path.insert(0, str(Path(__file__).parent))
    from test_steps import EMA_MODELS, MODEL_CFG, images, loss_cfg

    assert jax.device_count() == 8, jax.devices()
    models = registry.build_models(MODEL_CFG, set(registry.MODEL_NAMES))
    params, spectral = jax.device_get(
        registry.init_params(models, jax.random.key(0, impl="rbg"), (16, 16), 8))
    # eps 1e-6: parameters whose true gradient is 0 (e.g. attention key biases) get pure rounding
    # noise as gradient, which Adam's g / (|g| + eps) would blow up to ~lr * 1e-4 differences.
    txs = {k: optim.make_optimizer({"type": "Adam", "lr": 1e-3, "eps": 1e-6}, None, 1000,
                                   name=f"optimizers.{g}")
           for k, g in (("vae", "vae"), ("disc", "discriminator"), ("flow", "flow"))}
    r = np.random.default_rng(0)
    host_batch = {"image": images(8, 16), "input_ids": r.integers(1, 64, (8, 8)).astype(np.int32),
                  "attention_mask": np.ones((8, 8), np.int32)}
    rng = jax.random.key(3, impl="rbg")  # as the demo config: faster to compile than threefry
    cfg = loss_cfg(use_gan=True, adaptive_weights=True, ema_decay=0.9, train_text_encoder=True,
                   cfg_dropout_prob=0.25, r1_interval=1)

    def run(mesh, kinds):
        state = create_train_state(jax.tree.map(jnp.array, params), txs,
                                   spectral=jax.tree.map(jnp.array, spectral),
                                   ema_models=EMA_MODELS)
        sh = sharding.tree_shardings(state, mesh)
        state = jax.device_put(state, sh)
        batch = sharding.put_batch(host_batch, mesh)
        makers = {"disc": steps.make_disc_step, "vae": steps.make_vae_step,
                  "flow": steps.make_flow_step}
        out = {}
        for kind in kinds:
            kw = {"advance_step": True} if kind == "vae" else {}
            fn = makers[kind](models, txs[kind], cfg, mesh, sh, **kw)
            state, m = fn(state, batch, rng)
            out[kind] = jax.device_get((state, m))
        n_sharded = sum(any(a is not None for a in s.spec)
                        for s in jax.tree.leaves(sh, is_leaf=lambda x: hasattr(x, "spec")))
        return out, n_sharded

    single, _ = run(sharding.make_mesh((("data", 1),), devices=jax.devices()[:1]),
                    ("disc", "vae", "flow"))
    data8, _ = run(sharding.make_mesh((("data", -1),)), ("disc", "vae", "flow"))
    fsdp, n_fsdp = run(sharding.make_mesh((("data", 2), ("fsdp", 4))), ("disc", "vae"))

    def compare(a, b):
        la = jax.tree_util.tree_leaves_with_path(a)
        lb = jax.tree.leaves(b)
        bad, worst = [], 0.0
        for (path, x), y in zip(la, lb):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            if x.shape != y.shape or not np.allclose(x, y, rtol=1e-5, atol=1e-5):
                bad.append(sharding.path_str(path))
            if x.size and x.shape == y.shape:
                worst = max(worst, float(np.max(np.abs(x - y))))
        return {"mismatched": bad[:20], "n_leaves": len(la), "max_abs_diff": worst}

    res = {"n_devices": jax.device_count(), "fsdp_sharded_leaves": n_fsdp, "compare": {}}
    for kind in ("disc", "vae", "flow"):
        res["compare"][f"data8/{kind}"] = compare(data8[kind], single[kind])
    for kind in ("disc", "vae"):
        res["compare"][f"fsdp/{kind}"] = compare(fsdp[kind], single[kind])
    return res


if __name__ == "__main__":
    print(MARK + json.dumps(_child()), flush=True)
