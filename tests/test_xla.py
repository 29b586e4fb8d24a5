"""``fluxflow_jax.xla.jit``: on CPU, a jitted function whose largest convolution reaches 2**19
elements runs its convolutions with XLA's own kernels instead of YNNPACK's (whose kernel gradient
is 2-3x slower there on the Intel machine, benchmarks/README.md), or, with ``measure=True``,
with whichever library it measures faster (tests/test_conv_choice.py), with the same numbers;
smaller ones keep YNNPACK; a user's own ``XLA_FLAGS`` setting wins; nothing is passed off CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from test_discriminator import CANONICAL, conv_labels
from test_steps import (  # noqa: F401 - ``world`` is a fixture
    B, L, MODEL_CFG, RNG, adam, images, loss_cfg, partitioned, world)

from fluxflow_jax import sharding, steps, xla
from fluxflow_jax.models import registry
from fluxflow_jax.state import create_train_state


def ynn_conv_fusions(hlo: str) -> int:
    """How many YNN library fusions of the compiled module wrap a convolution."""
    n = 0
    for m in re.finditer(r"= \S+ fusion\([^\n]*calls=%(\S+),[^\n]*__ynn_fusion", hlo):
        body = re.search(r"\n%" + re.escape(m.group(1)) + r" .*?\n}", hlo, re.S).group(0)
        n += " convolution(" in body
    return n


def test_options_only_on_cpu_and_never_over_the_users_flag():
    assert xla.options_for("cpu", "") == {xla.YNN_FUSION_FLAG: xla.CPU_YNN_FUSIONS}
    assert "INDIVIDUAL_CONVOLUTION" not in xla.CPU_YNN_FUSIONS
    assert xla.options_for("cpu", "--xla_force_host_platform_device_count=8") is not None
    assert xla.options_for("cpu", f"--{xla.YNN_FUSION_FLAG}=LIBRARY_FUSION_TYPE_DOT") is None
    assert xla.options_for("gpu", "") is None and xla.options_for("tpu", "") is None
    # This process (CPU, the flag not set by the test runner) compiles with them.
    assert xla.compiler_options() == xla.options_for("cpu", "")


def conv_grad():
    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y))
    return jax.grad(loss, argnums=(0, 1))


def conv_args(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, shape[-1], shape[-1]))
    return x, w


def test_large_conv_gradient_moves_off_ynnpack_with_the_same_numbers():
    x, w = conv_args((2, 64, 64, 64))  # 2**19 elements: the threshold
    plain, ours = jax.jit(conv_grad()), xla.jit(conv_grad())
    assert xla.largest_conv(plain.trace(x, w).jaxpr.jaxpr) == 2 ** 19
    got = ours(x, w)
    assert ours.uses_xla_convolutions is True
    # jaxlib's default puts the forward and both gradients in YNN fusions; ours puts none there.
    assert ynn_conv_fusions(plain.lower(x, w).compile().as_text()) >= 2
    hlo = ours.lower(x, w).compile().as_text()
    assert ynn_conv_fusions(hlo) == 0 and " convolution(" in hlo
    for a, b in zip(got, plain(x, w)):
        b = np.asarray(b)  # sums over 8192 positions: compare at fp32 rounding of their scale
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_small_conv_gradient_stays_on_ynnpack():
    x, w = conv_args((2, 32, 32, 64))  # 2**17 elements: YNNPACK is level or faster
    ours = xla.jit(conv_grad())
    hlo = ours.lower(x, w).compile().as_text()
    assert ours.uses_xla_convolutions is False and ynn_conv_fusions(hlo) >= 2


def disc_step_for(world, base_ch, hw):  # noqa: F811
    cfg = {**MODEL_CFG, "disc": {"base_ch": base_ch, "depth": 1}}
    models = registry.build_models(cfg, set(registry.MODEL_NAMES))
    # Only the new discriminator is initialised (the world's other models are reused): its init
    # compiles in ~2.5 s, every model's in ~12 s.
    disc, spectral = registry.init_params(registry.build_models(cfg, {"discriminator"}),
                                          jax.random.key(0), (hw, hw), L)
    params = {**world.params, **disc}
    txs = {**world.txs, "disc": partitioned("disc", params, {"discriminator": "discriminator"},
                                            {"discriminator": adam(1e-3, "discriminator")})}
    state = create_train_state(params, txs, spectral=spectral)
    sh = sharding.tree_shardings(state, world.mesh)
    step = steps.make_disc_step(models, txs["disc"], loss_cfg(use_gan=True), world.mesh, sh)
    batch = sharding.put_batch({"image": images(B, hw)}, world.mesh)
    return step, jax.device_put(state, sh), batch


def test_training_step_chooses_by_its_largest_convolution(world, monkeypatch):  # noqa: F811
    """The engine's discriminator step: B=4 at 64 px with 32 channels (2**19 elements) is timed
    under both libraries (tests/test_conv_choice.py; here the measurement is replaced by XLA's
    winning, to compile one program only) and compiles its convolutions with XLA; the same step
    at 16 px keeps YNNPACK's without measuring."""
    monkeypatch.setattr(xla.conv_choice, "decisions_path", lambda: None)
    monkeypatch.setattr(xla.conv_choice, "_decided", {})
    monkeypatch.setattr(xla.conv_choice, "measure", lambda *_: {
        "library": "XLA", "seconds": {"XLA": 1.0, "YNNPACK": 2.0}})
    big, state, batch = disc_step_for(world, 32, 64)
    hlo = big.lower(state, batch, RNG).compile().as_text()
    assert big.jitted.uses_xla_convolutions is True
    assert big.jitted.conv_decision["by"] == "measured"
    assert hlo.count(" convolution(") >= 10 and ynn_conv_fusions(hlo) == 0
    monkeypatch.setattr(xla.conv_choice, "measure", None)  # measuring now would fail
    small, state, batch = disc_step_for(world, 32, 16)
    small.lower(state, batch, RNG)
    assert small.jitted.uses_xla_convolutions is False
    assert small.jitted.conv_decision == {"by": "size"}
    assert xla.convolution_choice(small.jitted) == "YNNPACK"


def test_disc_step_with_r1_compiles_every_discriminator_convolution_in_the_library_layout(
        world):  # noqa: F811
    """With R1 on, the engine's discriminator step runs D inside a ``lax.cond`` (lazy R1), where
    XLA:CPU compiles convolutions outside its canonical layout as plain loops (before
    ``layers.conv_stride1``: 57 of this step's 109 convolutions, 5.7 s a call at the suite's -O0
    against 0.08 s after). Every convolution of the compiled step that belongs to D - forward,
    input and kernel gradients, R1's double backward - is now in the canonical layout."""
    step, state, batch = disc_step_for(world, 32, 16)
    hlo = step.lower(state, batch, RNG).compile().as_text()
    convs = [ln for ln in hlo.splitlines()
             if " convolution(" in ln and "PatchDiscriminator" in ln]
    assert len(convs) > 40 and any("cond/branch_1_fun" in ln for ln in convs)
    assert set(conv_labels("\n".join(convs))) == {CANONICAL}


def test_compilation_cache_folder_threshold_and_jax_env_override(monkeypatch, tmp_path):
    """The entry points' cache: ``$FLUXFLOW_JAX_CACHE`` or the given folder, programs that
    compile in ``CACHE_MIN_COMPILE_S`` or more; JAX's own threshold variable, when the user set
    it (JAX reads it at import), is left as it is; ``'none'`` leaves the cache alone."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {n: getattr(jax.config, n) for n in names}
    try:
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        monkeypatch.setenv(xla.CACHE_ENV, str(tmp_path / "env"))
        xla.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == xla.CACHE_MIN_COMPILE_S
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "7")
        jax.config.update(names[1], 7.0)  # what JAX made of it at import
        xla.enable_compilation_cache(str(tmp_path / "given"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 7.0
        xla.enable_compilation_cache("none")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
    finally:
        for n, v in before.items():
            jax.config.update(n, v)


# registry.init_params in a process without XLA_FLAGS, as a user starts one: through
# ``xla.jit_once`` (-O1) and through a plain ``jax.jit`` (XLA's default level); both trees saved.
_INIT_PROBE = """
import json, sys
import jax, numpy as np
from fluxflow_jax import xla
from fluxflow_jax.models import registry
cfg, text_len, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
models = registry.build_models(cfg, set(registry.MODEL_NAMES))
key = jax.random.key(3)
ours = registry.init_params(models, key, (16, 16), text_len)
plain = registry.init_params(models, key, (16, 16), text_len, jit=jax.jit)
la, ta = jax.tree_util.tree_flatten(ours)
lb, tb = jax.tree_util.tree_flatten(plain)
assert ta == tb, "init trees differ"
np.savez(out, **{f"once_{i}": np.asarray(a) for i, a in enumerate(la)},
         **{f"plain_{i}": np.asarray(b) for i, b in enumerate(lb)})
print(json.dumps({"once_options": xla.once_options(), "leaves": len(la)}))
"""


def test_init_compiles_at_o1_with_the_same_parameters(tmp_path):
    """``registry.init_params`` runs through ``xla.jit_once`` (LLVM -O1 on CPU: about half the
    init's compile time); every model's parameters and the spectral state equal a plain
    ``jax.jit`` of the same init to the last bit or, in a few leaves (the spectral-norm vectors:
    a norm summed in another order), to a few rounding steps.

    In a process of its own without ``XLA_FLAGS``: the suite's flags (run_utils.TEST_XLA_FLAGS)
    set the level, which turns -O1 off as a user's own setting does, and their older emitters
    made these compiles twice as slow (``pytest tests/test_xla.py -k init_compiles``: 98 s in
    the pytest process, 64 s so)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "init.npz"
    p = subprocess.run([sys.executable, "-c", _INIT_PROBE, json.dumps(MODEL_CFG), str(L),
                        str(out)], env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["once_options"] == xla.ONCE_OPTIONS and info["leaves"] > 100
    trees = np.load(out)
    same = 0
    for i in range(info["leaves"]):
        a, b = trees[f"once_{i}"], trees[f"plain_{i}"]
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
        same += np.array_equal(a, b)
    assert same >= 0.9 * info["leaves"], (same, info["leaves"])
    # Under an outer trace (how weights.initial_variables takes the shapes) it still works.
    models = registry.build_models(MODEL_CFG, set(registry.MODEL_NAMES))
    shapes = jax.eval_shape(lambda: registry.init_params(models, jax.random.key(3), (16, 16), L))
    assert [s.shape for s in jax.tree.leaves(shapes)] == [
        trees[f"once_{i}"].shape for i in range(info["leaves"])]


def test_compiles_hand_the_freed_compiler_heap_back(monkeypatch):
    """After a backend compilation the allocator's free pages go back to the OS (before the
    executable runs): a cached call compiles nothing and trims nothing; compilations shorter
    than ``TRIM_AFTER_COMPILE_S`` are left alone."""
    assert xla._malloc_trim() is not None  # glibc (Linux, CI): the real trim is there
    calls = []
    x, x5 = jnp.arange(7.0), jnp.arange(5.0)
    f = xla.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    monkeypatch.setattr(xla, "_malloc_trim", lambda: calls.append)
    monkeypatch.setattr(xla, "TRIM_AFTER_COMPILE_S", 0.0)
    np.testing.assert_allclose(f(x), np.sin(np.arange(7.0)) * 3.0 + 1.0, rtol=1e-6)
    assert calls and set(calls) == {0}
    n = len(calls)
    f(x)
    assert len(calls) == n
    monkeypatch.setattr(xla, "TRIM_AFTER_COMPILE_S", 1e9)
    f(x5)  # a new shape compiles again, under the threshold now
    assert len(calls) == n


# A step with a 64 MB temporary block (larger than a glibc thread arena's heap can hold), run in
# a fresh process after configure_cpu_host or its opt-out: the page faults per call say whether
# the block is mapped and faulted in afresh each time.
_FAULT_PROBE = """
import json, resource
from fluxflow_jax import xla
status = xla.configure_cpu_host()
import jax, jax.numpy as jnp
x = jnp.linspace(-1.0, 1.0, 2 ** 24, dtype=jnp.float32).reshape(2 ** 21, 8)
w = jnp.linspace(-0.5, 0.5, 64, dtype=jnp.float32).reshape(8, 8)
c = jax.jit(lambda x, w: jnp.sum((jnp.tanh(x) @ w) * (jnp.sin(x) @ w.T), axis=0)).lower(
    x, w).compile()
faults = []
for _ in range(9):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = c(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"status": status, "temp": c.memory_analysis().temp_size_in_bytes,
                  "faults": faults[2:], "y": [float(v) for v in y]}))
"""


def _probe(env: dict) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    p = subprocess.run([sys.executable, "-c", _FAULT_PROBE], env={**e, **env},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_cpu_steps_reuse_their_temporaries_pages_with_the_same_numbers():
    """configure_cpu_host (what the entry points call first): a step's temporary block is no
    longer mapped and faulted in afresh at every call; the user's own dispatch setting opts out;
    the results are the same either way."""
    on = _probe({})
    off = _probe({"JAX_CPU_ENABLE_ASYNC_DISPATCH": "true"})
    assert on["status"] == "on"
    assert off["status"] == "skipped: JAX_CPU_ENABLE_ASYNC_DISPATCH is set"
    pages = on["temp"] / 4096
    assert on["temp"] == off["temp"] >= 2 ** 26
    assert min(off["faults"]) > 0.9 * pages, off  # JAX's default: every call faults it in
    # Configured: the same pages serve the next call (the heap settles in a call or two; a
    # late call may still grow it once, so the typical call is what is asserted).
    assert sorted(on["faults"])[len(on["faults"]) // 2] < 0.02 * pages, on
    assert on["y"] == off["y"]


def test_cpu_host_settings_respect_the_user_and_a_started_backend():
    jnp.ones(2).block_until_ready()  # this process's backends are up
    assert xla.configure_cpu_host() == "skipped: the JAX backends already started"
    assert _probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["status"] == (
        "skipped: the environment sets glibc's allocator")
