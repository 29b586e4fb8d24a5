"""``xla.jit(measure=True)`` (the training steps): on CPU a program whose largest convolution
reaches ``CONV_ELEMENTS_XLA`` is timed under both convolution libraries at its first call and runs
the faster; the decision is remembered (this process, and a file beside JAX's compilation cache)
so a restarted run compiles the same program without measuring; bad decision files, several
processes and one-off jits fall back to measuring or the size rule, as documented."""
from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
from test_steps import RNG, world  # noqa: F401 - ``world`` is a fixture
from test_xla import conv_args, conv_grad, disc_step_for, ynn_conv_fusions

from fluxflow_jax import xla
from fluxflow_jax.conv_choice import DECISIONS_FILE

cc = xla.conv_choice


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh process's view: nothing decided in memory, decisions kept in ``tmp_path``."""
    path = tmp_path / DECISIONS_FILE
    monkeypatch.setattr(cc, "decisions_path", lambda: path)
    monkeypatch.setattr(cc, "_decided", {})
    return path


def forbid_measuring(monkeypatch):
    def fail(*_):
        raise AssertionError("measured although the decision was known")
    monkeypatch.setattr(cc, "time_calls", fail)


def copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def test_training_step_runs_the_measured_faster_library_and_a_restart_remembers_it(
        world, store, monkeypatch):  # noqa: F811
    """The engine's discriminator step (at 16 px, the threshold lowered to keep the test short):
    its first call times both libraries on copies (the caller's donated state is consumed only
    by the real call), runs the faster and writes the decision; a new step of the same program in
    a 'new process' reads the file instead of measuring, and the two runs give bit-identical
    states and metrics."""
    monkeypatch.setattr(xla, "CONV_ELEMENTS_XLA", 2 ** 12)
    timed = []
    real = cc.time_calls
    monkeypatch.setattr(cc, "time_calls", lambda *a, **k: timed.append(real(*a, **k)) or timed[-1])
    step, state, batch = disc_step_for(world, 32, 16)
    state2 = copy(state)
    new1, m1 = step(state, batch, RNG)
    how = step.jitted.conv_decision
    assert len(timed) == 1 and how["by"] == "measured"
    t_xla, t_ynn = timed[0]
    assert how["seconds"] == {"XLA": round(t_xla, 6), "YNNPACK": round(t_ynn, 6)}
    assert how["library"] == ("YNNPACK" if t_ynn < (1 - cc.MARGIN) * t_xla else "XLA")
    assert step.jitted.uses_xla_convolutions is (how["library"] == "XLA")
    assert xla.convolution_choice(step.jitted).startswith(f"{how['library']} (measured: ")
    saved = json.loads(store.read_text())
    assert len(saved) == 1 and next(iter(saved.values()))["library"] == how["library"]
    assert np.isfinite(float(m1["train/loss_d"]))

    monkeypatch.setattr(cc, "_decided", {})  # a restarted process: only the file knows
    forbid_measuring(monkeypatch)
    again, _, _ = disc_step_for(world, 32, 16)
    new2, m2 = again(state2, batch, RNG)
    assert again.jitted.conv_decision["by"] == "remembered"
    assert again.jitted.uses_xla_convolutions is step.jitted.uses_xla_convolutions
    assert f"remembered from {store}" in xla.convolution_choice(again.jitted)
    for a, b in zip(jax.tree.leaves((new1, m1)), jax.tree.leaves((new2, m2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("times, library, ynn_fusions", [
    ((1.0, 2.0), "XLA", 0), ((2.0, 1.0), "YNNPACK", 2),
    ((1.0, 0.97), "XLA", 0)])  # YNNPACK 3% faster: within the margin, the size rule's XLA stays
def test_the_faster_library_is_the_one_compiled(store, monkeypatch, times, library, ynn_fusions):
    """Whichever library times clearly faster (timings faked here) is the program that runs and
    that ``lower`` hands out; the numbers are the same up to rounding either way."""
    monkeypatch.setattr(cc, "time_calls", lambda fns, a, k: list(times))
    x, w = conv_args((2, 64, 64, 64))
    f = xla.jit(conv_grad(), measure=True)
    got = f(x, w)
    assert f.conv_decision["library"] == library and xla.convolution_library(f) == library
    hlo = f.lower(x, w).compile().as_text()
    assert (ynn_conv_fusions(hlo) >= 2) if ynn_fusions else (ynn_conv_fusions(hlo) == 0)
    for a, b in zip(got, jax.jit(conv_grad())(x, w)):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=1e-5 * np.abs(b).max())
    assert json.loads(store.read_text())[cc.program_key(
        jax.jit(conv_grad()).lower(x, w).as_text())]["library"] == library


def test_a_damaged_decisions_file_is_named_measured_again_and_rewritten(store, monkeypatch,
                                                                          caplog):
    store.write_text("{not json")
    monkeypatch.setattr(cc, "time_calls", lambda fns, a, k: [2.0, 1.0])
    x, w = conv_args((2, 64, 64, 64))
    with caplog.at_level(logging.WARNING):
        f = xla.jit(conv_grad(), measure=True)
        f(x, w)
    assert f.conv_decision["by"] == "measured"
    assert any(str(store) in r.getMessage() and "measured again" in r.getMessage()
               for r in caplog.records)
    assert [v["library"] for v in json.loads(store.read_text()).values()] == ["YNNPACK"]


def test_only_large_convolutions_of_one_process_under_measure_are_measured(store, monkeypatch):
    """Below ``CONV_ELEMENTS_XLA``, without ``measure`` (one-off jits), lowered from shapes, or
    with several processes compiling one program, the size rule decides and nothing is timed or
    written."""
    forbid_measuring(monkeypatch)
    x, w = conv_args((2, 32, 32, 64))  # 2**17
    small = xla.jit(conv_grad(), measure=True)
    small(x, w)
    assert small.conv_decision == {"by": "size"} and xla.convolution_library(small) == "YNNPACK"
    x, w = conv_args((2, 64, 64, 64))
    once = xla.jit(conv_grad())
    once(x, w)
    assert once.conv_decision == {"by": "size"} and xla.convolution_choice(once) == "XLA"
    shapes = xla.jit(conv_grad(), measure=True)  # lowered from shapes: cannot be timed
    hlo = shapes.lower(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w))).compile()
    assert ynn_conv_fusions(hlo.as_text()) == 0 and shapes.conv_decision is None
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    multi = xla.jit(conv_grad(), measure=True)
    multi(x, w)
    assert multi.conv_decision == {"by": "size"} and multi.uses_xla_convolutions is True
    assert not store.exists()


def test_decisions_live_beside_the_compilation_cache_and_key_on_program_and_machine(tmp_path):
    """The decisions go into JAX's persistent cache folder, wherever it is set (none for a
    remote one); the key changes with the program text."""
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert cc.decisions_path() == tmp_path / DECISIONS_FILE
        jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")
        assert cc.decisions_path() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert cc.program_key("a") == cc.program_key("a") != cc.program_key("b")
    machine = json.loads(cc.machine_id())
    assert int(machine["cpus"]) >= 1 and len(machine) >= 2


def test_timing_runs_on_copies_and_leaves_the_callers_arrays():
    """``time_calls``: every call gets fresh copies of the array arguments, so the caller's
    donated arrays are never consumed and every call starts from the same values."""
    step = jax.jit(lambda s, x: (s + x, jax.numpy.sum(s)), donate_argnums=(0,))
    seen = []

    def spy(s, x):
        seen.append((float(s[0]), s is not s0, x is not x0))
        return step(s, x)
    s0, x0 = jax.numpy.zeros(4), jax.numpy.ones(4)
    best = cc.time_calls([spy, spy], (s0, x0), {})
    assert len(best) == 2 and all(0 < t < 60 for t in best)
    assert seen == [(0.0, True, True)] * 4
    assert not s0.is_deleted() and not x0.is_deleted()
    np.testing.assert_array_equal(np.asarray(s0), np.zeros(4))
