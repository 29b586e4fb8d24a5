"""Nothing lost, nothing let in: divergence, damaged state, missing stage outputs, signals, secrets.

Each end-to-end check runs ``python -m fluxflow_jax.main`` on the demo's test size, as a user would,
and asserts the exit code, the one-line message and what is left on disk.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import _ckpt_steps, _run, _start, _wait_for  # noqa: E402

from fluxflow_jax import checkpoint, workdir  # noqa: E402

pytestmark = pytest.mark.xdist_group("reliability")
SHORT = ("--config.stages.vae_warmup.steps=4", "--config.stages.vae_gan.steps=2",
         "--config.stages.flow.steps=2", "--config.stages.flow.schedulers.flow.warmup_steps=1",
         "--config.checkpoint.interval_steps=2")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("short")
    p = _run(wd, *SHORT)
    assert p.returncode == 0, p.stderr[-4000:]
    return wd


def _state(x):
    return {"params": {"w": jnp.full((3,), x, jnp.float32)}, "step": jnp.int32(x)}


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_step(tmp_path, capsys):
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        for s in (1, 2, 3):
            ck.save(s, _state(s), {"pos": s}, {"m": s}, force=True)
    for f in (tmp_path / "ck" / "3").rglob("*"):  # a half-copied folder: every file truncated
        if f.is_file():
            f.write_bytes(b"")
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        state, data, meta = ck.restore(jax.eval_shape(lambda: _state(0)))
        assert int(state["step"]) == 2 and data == {"pos": 2} and meta == {"m": 2}
        assert ck.all_steps() == [1, 2]
    moved = list((tmp_path / "ck.damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("3-")  # moved aside, never deleted
    assert "step 3" in capsys.readouterr().out


def test_no_intact_checkpoint_is_one_line_naming_the_directory(tmp_path):
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(1, _state(1), {}, {}, force=True)
    for f in (tmp_path / "ck" / "1").rglob("*"):
        if f.is_file():
            f.write_bytes(b"{")
    with checkpoint.Checkpointer(tmp_path / "ck", async_save=False) as ck:
        with pytest.raises(checkpoint.CheckpointError) as e:
            ck.restore(jax.eval_shape(lambda: _state(0)))
    assert str(tmp_path / "ck") in str(e.value) and "\n" not in str(e.value)


def test_damaged_pipeline_state_is_rebuilt_from_disk(tmp_path):
    for stage in ("a", "b"):
        workdir.stage_params_path(tmp_path, stage).parent.mkdir(parents=True)
        workdir.stage_params_path(tmp_path, stage).write_bytes(b"x")
    workdir.pipeline_state_path(tmp_path).write_text('{"finished": ["a", "b"], "curr')
    state = workdir.read_pipeline_state(tmp_path, ["a", "b", "c"])
    assert state["finished"] == ["a", "b"]
    assert list(tmp_path.glob("pipeline_state.json.damaged-*"))  # the damaged file is kept


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path):
    wd = tmp_path / "div"
    p = _run(wd, "--config.stages.vae_warmup.optimizers.vae.lr=1e30",
             "--config.stages.vae_warmup.steps=40", "--config.checkpoint.interval_steps=1")
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert "non-finite loss or gradient, update skipped" in p.stdout + p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: 5 non-finite updates in a row")
    ps = json.loads((wd / "pipeline_state.json").read_text())
    assert ps["finished"] == [] and ps["last_stop"]["diverged"]
    assert not (wd / "stages" / "vae_warmup").exists()  # nothing exported from a diverged stage
    # the curves up to the divergence are drawn (interval checkpoints this close skip the plots)
    assert (wd / "graph" / "vae_warmup_training_losses.png").read_bytes()[:4] == b"\x89PNG"
    steps = _ckpt_steps(wd, "vae_warmup")
    assert steps and steps[-1] < ps["last_stop"]["step"]
    restored = checkpoint.Checkpointer(wd / "checkpoints" / "vae_warmup", async_save=False)
    meta = restored._manager.restore(steps[-1])  # the last saved state is finite
    leaves = jax.tree.leaves(meta["state"]["params"])
    restored.close()
    assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_missing_previous_stage_file_fails_naming_it(short_run, tmp_path):
    wd = tmp_path / "copy"
    shutil.copytree(short_run, wd)
    ps = json.loads((wd / "pipeline_state.json").read_text())
    ps["finished"] = ["vae_warmup"]
    (wd / "pipeline_state.json").write_text(json.dumps(ps))
    shutil.rmtree(wd / "checkpoints" / "vae_gan")
    missing = wd / "stages" / "vae_warmup" / "params.safetensors"
    missing.unlink()
    p = _run(wd, *SHORT)
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "is missing" in err[0], p.stderr
    assert "Traceback" not in p.stderr
    assert "created new ['compressor'" not in p.stdout  # never re-created silently


def test_sigterm_before_the_first_step_saves_and_exits_75(tmp_path):
    wd = tmp_path / "early"
    with open(tmp_path / "log.txt", "w") as log:
        proc = _start(wd, *SHORT, "--config.stages.vae_warmup.steps=100000", log=log)
        _wait_for(lambda: "compiling" in (tmp_path / "log.txt").read_text(), proc,
                  what="the compile message")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert rc == 75, text[-3000:]
    assert "received SIGTERM" in text and "saved a checkpoint at step" in text
    assert _ckpt_steps(wd, "vae_warmup")


def test_no_secret_reaches_the_workdir_or_the_console(tmp_path):
    wd = tmp_path / "secret"
    p = _run(wd, "--config.datasets.shapes.type=webdataset",
             "--config.datasets.shapes.urls="
             "https://user:S3CRETPASS@127.0.0.1:9/shard-{0..1}.tar?token=S3CRETTOKEN")
    assert p.returncode == 2  # nothing can be read from that address: one line, no traceback
    assert "S3CRET" not in p.stdout + p.stderr
    written = [f for f in wd.rglob("*") if f.is_file()]
    assert (wd / "config.json") in written
    assert not [f for f in written if b"S3CRET" in f.read_bytes()]
