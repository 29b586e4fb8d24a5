"""Checkpointer: round trips with optax states, keep-N, intervals, crash safety, clear mismatch errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_utils import xla_flags

from fluxflow_jax.checkpoint import Checkpointer, CheckpointMismatchError


def make_state(seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "enc": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros((4,))},
        "dec": {"kernel": jax.random.normal(k2, (4, 2))},
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(1e-3))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed + 1)),
    }


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_preserves_types_values_and_json_items(tmp_path):
    state = make_state(0)
    with Checkpointer(tmp_path / "ckpt", save_interval_steps=10) as ckpt:
        assert ckpt.save(10, state, {"pos": 123, "epoch": 2}, {"stage": "vae"})
        ckpt.wait_until_finished()
        abstract = jax.eval_shape(lambda: state)
        restored, data, meta = ckpt.restore(abstract)
    assert_trees_equal(restored, state)
    # optax namedtuples come back as namedtuples, not dicts
    assert type(restored["opt_state"][1]) is type(state["opt_state"][1])
    assert type(restored["opt_state"][1].inner_state[0]) is optax.ScaleByAdamState
    assert float(restored["opt_state"][1].hyperparams["learning_rate"]) == pytest.approx(1e-3)
    assert isinstance(restored["params"]["enc"]["kernel"], jax.Array)
    assert restored["rng"].dtype == jnp.uint32
    assert data == {"pos": 123, "epoch": 2} and meta == {"stage": "vae"}


def test_restore_with_concrete_target_plain_ints_and_typed_keys(tmp_path):
    state = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "step": 41,  # a plain Python int
        "host": np.arange(4, dtype=np.int64),
        "key": jax.random.key(3),  # a typed key: stored as key data, re-wrapped on restore
    }
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save(41, state, {}, {}, force=True)
        target = dict(
            state, w=jnp.zeros((2, 3)), step=0, host=np.zeros(4, np.int64), key=jax.random.key(0)
        )
        restored, _, _ = ckpt.restore(target)
        abstract_restored, _, _ = ckpt.restore(jax.eval_shape(lambda: state))
    assert restored["step"] == 41
    np.testing.assert_array_equal(restored["host"], state["host"])
    np.testing.assert_array_equal(restored["w"], state["w"])
    for r in (restored, abstract_restored):
        assert jax.dtypes.issubdtype(r["key"].dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(
            jax.random.key_data(r["key"]), jax.random.key_data(state["key"])
        )
        # the restored key draws the same numbers as the original
        np.testing.assert_array_equal(
            jax.random.normal(r["key"], (3,)), jax.random.normal(state["key"], (3,))
        )


def test_restore_when_nothing_saved_is_none(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.all_steps() == []
        assert ckpt.restore(jax.eval_shape(lambda: make_state())) is None


def test_keep_n_latest_step_and_restore_of_older_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1) as ckpt:
        for step in (1, 2, 3, 4):
            state = make_state(step)
            assert ckpt.save(step, state, {"s": step}, {})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
        assert ckpt.latest_step() == 4
        restored, data, _ = ckpt.restore(jax.eval_shape(lambda: state), step=3)
        assert data == {"s": 3}
        assert_trees_equal(restored, make_state(3))
        with pytest.raises(FileNotFoundError, match="no checkpoint step 1 .*available: \\[3, 4\\]"):
            ckpt.restore(jax.eval_shape(lambda: state), step=1)
    # a new Checkpointer on the same directory sees the same steps
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() == 4


def test_step_interval_logic_and_idempotent_saves(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, save_interval_steps=5, async_save=False) as ckpt:
        assert [s for s in range(21) if ckpt.should_save(s)] == [5, 10, 15, 20]
        assert not ckpt.save(3, state, {}, {})  # not due
        assert ckpt.save(3, state, {}, {}, force=True)  # forced
        assert ckpt.save(5, state, {}, {})
        assert not ckpt.should_save(5)  # already saved
        assert not ckpt.save(5, state, {}, {}, force=True)  # idempotent: nothing new written
        with pytest.raises(ValueError, match="below the latest saved step 5"):
            ckpt.save(4, state, {}, {}, force=True)
        assert ckpt.all_steps() == [3, 5]


def test_time_interval_logic(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    state = make_state()
    with Checkpointer(
        tmp_path, save_interval_steps=0, save_interval_minutes=2.0, async_save=False
    ) as ckpt:
        assert not ckpt.should_save(1)
        clock[0] += 119.0
        assert not ckpt.should_save(2)
        clock[0] += 1.0
        assert ckpt.should_save(3)
        assert ckpt.save(3, state, {}, {})
        assert not ckpt.should_save(4)  # the clock restarts at a save
        clock[0] += 121.0
        assert ckpt.should_save(5)


def test_shape_mismatch_names_the_leaf(tmp_path):
    state = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, {}, {}, force=True)
        bad = jax.eval_shape(lambda: state)
        bad["params"]["enc"]["kernel"] = jax.ShapeDtypeStruct((5, 4), jnp.float32)
        bad["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
        with pytest.raises(CheckpointMismatchError) as err:
            ckpt.restore(bad)
    msg = str(err.value)
    assert "params.enc.kernel" in msg and "checkpoint (3, 4) vs target (5, 4)" in msg
    assert "missing in checkpoint (1): params.extra" in msg
    # the optimizer moments of the same parameter are fine and not reported
    assert "opt_state.1.inner_state.0.mu.enc.kernel" not in msg


def test_non_json_items_fail_before_writing(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="'meta' is not JSON-serialisable"):
            ckpt.save(1, make_state(), {}, {"bad": float("nan")}, force=True)
        with pytest.raises(TypeError, match="'data' is not JSON-serialisable"):
            ckpt.save(1, make_state(), {"bad": object()}, {}, force=True)
        assert ckpt.all_steps() == []
    assert list(tmp_path.iterdir()) == [] or all(p.name != "1" for p in tmp_path.iterdir())


def test_leftover_partial_tmp_dir_is_ignored_and_cleaned(tmp_path):
    state = make_state(2)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, state, {"s": 2}, {}, force=True)
    # what a crash during the write of step 3 leaves: a tmp dir with part of the files, some truncated
    partial = tmp_path / "3.orbax-checkpoint-tmp-1712345678"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text('{"tree_metadata": {"par')
    (partial / "data").mkdir()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2
        restored, data, _ = ckpt.restore(jax.eval_shape(lambda: state))
        assert data == {"s": 2}
        assert_trees_equal(restored, state)
        assert not partial.exists()  # cleaned up when the directory was opened
        assert ckpt.save(
            3, make_state(3), {"s": 3}, {}, force=True
        )  # the step can be written again
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2, 3]


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from fluxflow_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(1, {"w": jnp.full((64, 64), 1.0)}, {"s": 1}, {}, force=True)
    ckpt.wait_until_finished()

    async def die(*args, **kwargs):  # the process dies after writing the items, before the rename
        os._exit(17)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, {"w": jnp.full((64, 64), 2.0)}, {"s": 2}, {}, force=True)
    ckpt.wait_until_finished()
    os._exit(0)
    """
)


def test_process_killed_mid_save_keeps_previous_step(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # a real partial write
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, data, _ = ckpt.restore({"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)})
    assert data == {"s": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((64, 64), np.float32))


RESHARD_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fluxflow_jax.checkpoint import Checkpointer

    devs = np.asarray(jax.devices())
    assert devs.size == 8, devs
    save_mesh = Mesh(devs, ("fsdp",))
    w = jax.device_put(jnp.arange(64.0).reshape(16, 4), NamedSharding(save_mesh, P("fsdp", None)))
    # Small leaves replicated on all 8 devices, each of another shape: the save writes each whole
    # from one replica, with no per-shape slice to compile (orbax's default cuts them in 8).
    reps = {f"r{i}": jax.device_put(np.full((8, i + 1), i, np.float32), NamedSharding(save_mesh, P()))
            for i in range(6)}
    b = jnp.ones(3)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(5, {"w": w, "b": b, **reps}, {}, {}, force=True)
    assert compiles == [], f"the save compiled {len(compiles)} programs"
    # restore onto another layout: a 2x4 mesh, w split over its columns, b without a given sharding
    mesh = Mesh(devs.reshape(2, 4), ("data", "model"))
    target = {
        "w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh, P(None, "model"))),
        "b": jax.ShapeDtypeStruct((3,), jnp.float32),
        **{k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in reps.items()},
    }
    with Checkpointer(sys.argv[1]) as ckpt:
        state, _, _ = ckpt.restore(target)
    assert state["w"].sharding == target["w"].sharding, state["w"].sharding
    assert state["w"].sharding.spec == P(None, "model")
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64.0).reshape(16, 4))
    assert state["b"].sharding.is_fully_replicated and len(state["b"].sharding.device_set) == 8
    for k, v in reps.items():
        np.testing.assert_array_equal(np.asarray(state[k]), np.asarray(v))
    print("RESHARD_OK")
    """
)


def test_restore_onto_a_different_sharding_layout_and_save_compiles_nothing(tmp_path):
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8)
    )
    proc = subprocess.run(
        [sys.executable, "-c", RESHARD_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0 and b"RESHARD_OK" in proc.stdout, proc.stderr.decode()[-3000:]


def test_async_save_is_safe_against_donating_the_state_right_after(tmp_path):
    state = {f"w{i}": jnp.full((256, 256), 1.0, jnp.float32) for i in range(4)}
    step = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 7.0, s), donate_argnums=0)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, state, {}, {}, force=True)
        state = step(step(state))  # reuses the buffers the background save may still be writing
        jax.block_until_ready(state)
        ckpt.wait_until_finished()
        restored, _, _ = ckpt.restore(jax.eval_shape(lambda: state))
    for v in restored.values():
        np.testing.assert_array_equal(np.asarray(v), np.ones((256, 256), np.float32))
