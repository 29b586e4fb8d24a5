"""The compile options every convolutional jit uses (``fluxflow_jax.xla``): on CPU, convolutions
leave YNNPACK (whose kernel gradient is ~3x slower, benchmarks/README.md) for XLA's own, with the
same numbers; a user's own ``XLA_FLAGS`` setting wins; nothing is passed off CPU."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from test_steps import (  # noqa: F401 - ``world`` is a fixture
    HW, L, MODEL_CFG, RNG, adam, loss_cfg, partitioned, world)

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


def test_conv_gradient_moves_off_ynnpack_with_the_same_numbers():
    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y))

    # 32 channels: jaxlib sends smaller convolutions to XLA anyway.
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
    grad = jax.grad(loss, argnums=(0, 1))
    plain = jax.jit(grad).lower(x, w).compile()
    ours = xla.jit(grad).lower(x, w).compile()
    # jaxlib's default puts the forward and both gradients in YNN fusions; ours puts none there.
    assert ynn_conv_fusions(plain.as_text()) >= 2
    assert ynn_conv_fusions(ours.as_text()) == 0 and " convolution(" in ours.as_text()
    for a, b in zip(ours(x, w), plain(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_training_step_compiles_convolutions_outside_ynnpack(world):  # noqa: F811
    """The engine's discriminator step (32 channels, so jaxlib would use YNNPACK)."""
    cfg = {**MODEL_CFG, "disc": {"base_ch": 32, "depth": 1}}
    models = registry.build_models(cfg, set(registry.MODEL_NAMES))
    params, spectral = registry.init_params(models, jax.random.key(0), (HW, HW), L)
    txs = {**world.txs, "disc": partitioned("disc", params, {"discriminator": "discriminator"},
                                            {"discriminator": adam(1e-3, "discriminator")})}
    state = create_train_state(params, txs, spectral=spectral)
    sh = sharding.tree_shardings(state, world.mesh)
    state = jax.device_put(state, sh)
    disc_step = steps.make_disc_step(models, txs["disc"], loss_cfg(use_gan=True), world.mesh, sh)
    hlo = disc_step.lower(state, world.batch, RNG).compile().as_text()
    plain = jax.jit(disc_step.jitted.__wrapped__).lower(state, world.batch, RNG).compile()
    assert hlo.count(" convolution(") >= 10
    assert ynn_conv_fusions(plain.as_text()) >= 4
    assert ynn_conv_fusions(hlo) == 0
