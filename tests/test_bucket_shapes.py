"""A stage on a folder of two aspect buckets, through ``pipeline.run`` as the entry point calls
it: each batch shape compiles the steps once. With ``compile_ahead`` (the default) the shape the
plan brings later is compiled in a background thread once the first has compiled, and its first
step reuses that program; without, it compiles when it arrives, announced with its compile time
(a pause of minutes at Phase 1 size would otherwise look like a hang). Either way the metrics
JSONL counts the shapes and the seconds spent compiling and waiting, and the numbers are the
same bit for bit."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
from run_utils import load_config
from test_data_helpers import encode, shape_image

from fluxflow_jax import compile_ahead, pipeline
from fluxflow_jax import config_defaults as cd
from fluxflow_jax.data import write_shapes_folder


def _run(tmp_path, capsys, ahead: int) -> tuple[str, list[dict]]:
    data = write_shapes_folder(tmp_path / "f", 8, img_size=32)
    for i in range(4, 8):  # half of the images wide: a second bucket
        (tmp_path / "f" / f"{i:06d}.png").write_bytes(encode(shape_image(i, (32, 48))))
    c = load_config()
    c.datasets.shapes = cd.dataset_config(**data, img_size=32, resize_mode="bucket",
                                          buckets=[[32, 32], [32, 48]])
    c.stage_order = ("vae_warmup",)
    c.batch_size = 2
    c.stages.vae_warmup.steps = 8  # two epochs of 2 square and 2 wide batches
    c.stages.vae_warmup.stop_metric = ""
    c.log_interval = 1
    c.samples.enabled = False
    c.compile_ahead = ahead
    state = pipeline.run(mlc.ConfigDict(c), tmp_path / "w")
    got = capsys.readouterr()
    assert state["finished"] == ["vae_warmup"]
    rows = [json.loads(ln) for ln in (tmp_path / "w" / "graph" /
                                      "training_metrics_vae_warmup.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    return got.out + got.err, rows  # messages during the stage go with the progress bar: stderr


def _new_shape_step(out: str, rows: list[dict], how: str) -> tuple[int, float]:
    """The step of the other shape's one announcement and its compile seconds, checked against
    the JSONL's counts."""
    assert len(re.findall(r"\[vae_warmup\] compiled vae in [0-9.]+ s", out)) == 1, out
    new = re.findall(r"\[vae_warmup\] step (\d+): new batch shape image 2x32x(\d+)x3: compiled "
                     rf"vae {how} \(shape 2, ([0-9]+) s compiling in this stage\)", out)
    assert len(new) == 1 and 2 <= int(new[0][0]) <= 8, out  # the other shape, once
    step = int(new[0][0])
    assert [r["extras"]["batch_shapes"] for r in rows] == [1] * (step - 1) + [2] * (9 - step)
    spent = [r["extras"]["compile_s"] for r in rows]
    waited = [r["extras"]["compile_wait_s"] for r in rows]
    assert spent[0] > 0 and waited[0] == spent[0]  # the first shape: the loop waits for it all
    assert spent[-1] == spent[step - 1] and waited[-1] == waited[step - 1]  # none after both
    return step, spent[step - 1] - spent[0]


def test_bucket_shapes_compile_ahead_or_when_met_with_the_same_numbers(tmp_path, capsys):
    out, rows = _run(tmp_path / "ahead", capsys, ahead=1)
    assert re.search(r"\[vae_warmup\] compiling 1 more batch shape\(s\) ahead in 1 thread\(s\): "
                     r"image 2x32x(32|48)x3\n", out), out
    step, secs = _new_shape_step(out, rows, r"ahead in ([0-9.]+) s, waited ([0-9.]+) s")
    msg = re.search(r"compiled vae ahead in ([0-9.]+) s, waited ([0-9.]+) s \(", out)
    assert abs(secs - float(msg[1])) <= 0.07  # the message rounds to 0.1 s, the JSONL to 0.01 s
    assert "compiled again" not in out  # the first call at that shape reused the program
    # The loop stopped only for the first shape and the wait at the second (compiling ahead
    # overlapped the steps before it).
    waited = rows[-1]["extras"]["compile_wait_s"]
    assert abs(waited - rows[0]["extras"]["compile_wait_s"] - float(msg[2])) <= 0.07
    # A pause is announced when it starts: here the compile ahead was still running when the
    # shape came (a wait of a second or more means it was).
    pause = re.findall(r"step (\d+): new batch shape image 2x32x\d+x3: waiting for its compile "
                       r"ahead \.\.\.\n", out)
    assert pause == [str(step)] or (not pause and float(msg[2]) < 1.0), out

    out0, rows0 = _run(tmp_path / "off", capsys, ahead=0)
    assert "ahead" not in out0
    step0, secs0 = _new_shape_step(out0, rows0, r"in ([0-9.]+) s")
    assert re.findall(r"step (\d+): new batch shape image 2x32x\d+x3: compiling \.\.\.\n",
                      out0) == [str(step0)]
    msg0 = re.search(r"new batch shape image 2x32x\d+x3: compiled vae in ([0-9.]+) s", out0)
    assert abs(secs0 - float(msg0[1])) <= 0.07
    assert rows0[-1]["extras"]["compile_wait_s"] == rows0[-1]["extras"]["compile_s"]
    assert step0 == step  # the same plan
    for a, b in zip(rows, rows0):  # the same programs: the same numbers
        assert a["global_step"] == b["global_step"] and a["metrics"] == b["metrics"], (a, b)


def test_compile_ahead_threads_follow_the_setting_and_the_processes():
    assert compile_ahead.threads_for(-1, 1, 2) == 1
    assert compile_ahead.threads_for(-1, 1, 16) == 4
    assert compile_ahead.threads_for(-1, 1, 96) == 8
    assert compile_ahead.threads_for(0, 1, 16) == 0
    assert compile_ahead.threads_for(3, 1, 2) == 3
    assert compile_ahead.threads_for(3, 2, 16) == 1  # one per process, in the same order
    assert compile_ahead.threads_for(0, 2, 16) == 0


def test_a_stream_of_several_buckets_says_it_cannot_compile_ahead(tmp_path, capsys):
    from fluxflow_jax.data import make_loader
    from fluxflow_jax.data.demo import write_shapes_shards
    shards = write_shapes_shards(tmp_path / "s", 4, 2, img_size=32)
    mk = lambda **kw: make_loader({**shards, "img_size": 32, **kw}, global_batch_size=2, seed=0,
                                  tokenizer=None, process_index=0, process_count=1)
    assert mk(resize_mode="bucket", buckets=[[32, 32], [32, 48]]).upcoming_shapes(5) is None
    assert mk(resize_mode="fixed").upcoming_shapes(5) == []  # one shape: nothing more to compile
    compiles = compile_ahead.StageCompiles("flow", ("flow",), {}, threads=1)
    compiles.ahead(None, None, {}, None)
    assert capsys.readouterr().out == (
        "[flow] compile ahead: this loader cannot tell its batch shapes ahead (a stream of "
        "several buckets); each new shape compiles when met\n")
    compile_ahead.StageCompiles("flow", ("flow",), {}, threads=0).ahead(None, None, {}, None)
    assert capsys.readouterr().out == ""  # off: nothing to say


class _Step:
    """A step whose ``lower`` compiles ``lowered`` and whose call runs ``called``."""

    def __init__(self, lowered, called):
        self.lower, self._called = jax.jit(lowered).lower, jax.jit(called)

    def __call__(self, state, batch, rng):
        return self._called(state, batch["image"])


def test_an_ahead_compile_that_fails_or_is_not_reused_is_reported(capsys):
    state, rng = {"w": jnp.ones(3)}, jax.random.key(0)
    first = {"image": jnp.zeros((2, 4, 4, 3))}

    def boom(state, batch, rng):
        raise ValueError("no such shape")

    def called(k):  # a new function each time: jit's cache does not know it
        return lambda state, image: image.sum() * state["w"].sum() + k

    def g(state, batch, rng):
        return batch["image"].mean()

    failed = "compiling image 2x4x8x3 ahead failed (ValueError: no such shape); compiling it now"
    again = "(and compiled again here: the ahead program was not reused)"
    for k, (lowered, expect) in enumerate([(boom, failed), (g, again)]):
        step = _Step(lowered, called(k))
        compiles = compile_ahead.StageCompiles("s", ("x",), {"x": step}, threads=1)
        compiles.compile_s["image 2x4x4x3"] = 1.0  # the first shape, as the loop leaves it
        compiles.ahead(state, rng, first, [{"image": (2, 4, 8, 3)}])
        batch = {"image": jnp.ones((2, 4, 8, 3))}
        lines = []
        assert compiles.begin("image 2x4x8x3", 5, lines.append)
        out = step(state, batch, rng)
        compiles.end("image 2x4x8x3", 5, out, lines.append)
        compiles.close()
        text = capsys.readouterr().out + "\n".join(lines)
        assert expect in text, text
        assert compiles.recompiled == (lowered is g)
        assert not compiles.begin("image 2x4x8x3", 6, lines.append)  # met: never again
