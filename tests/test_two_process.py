"""Multi-host JAX on one machine: 2 processes x 4 CPU devices must train exactly like 1 x 8.

``python -m fluxflow_jax.main --distributed=on`` in two processes that meet at a local
coordinator (127.0.0.1, a free port; gloo CPU collectives, JAX's default), against the same
command with ``--distributed=off`` on one process with 8 devices. Same global mesh, same global
batches (each host feeds its half), so the per-step losses in the metrics JSONL and the exported
weights must agree. Two short stages (VAE warm-up, then flow on it) keep it cheap and still cover
the stage-to-stage hand-off through ``stages/<stage>/params.safetensors`` that only process 0
writes. Also checked: only process 0 writes the run's files, and both exit 0; held-out eval runs
on both hosts; a 2-process checkpoint resumes in 1 process (another topology) with the same
numbers; start-up mistakes and a dead host end with a message instead of a hang.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from run_utils import compile_cache, rewound_copy, xla_flags
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[1]
CACHE = compile_cache()
ARGS = ["--config=configs/demo.py:test", "--config.batch_size=8",
        "--config.stage_order=('vae_warmup','flow')", "--config.stages.vae_warmup.steps=4",
        "--config.stages.flow.steps=11", "--config.checkpoint.interval_steps=4",
        "--config.eval.interval_steps=4"]
TIMEOUT = 2400



def _num(v):
    """A JSONL metric as a number: null (a NaN the writer stored, e.g. a score with no scene to
    score) becomes NaN, which assert_allclose treats as equal to NaN."""
    return np.nan if v is None else v

def _env(devices, **extra):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", FLUXFLOW_JAX_CACHE=CACHE,
               XLA_FLAGS=xla_flags(devices), **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env | extra


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(workdir, distributed):
    return [sys.executable, "-m", "fluxflow_jax.main", f"--workdir={workdir}",
            f"--distributed={distributed}", *ARGS]


def _losses(workdir):
    """Per stage, per step: every metric and learning rate the JSONL logged (timings left out)."""
    out = {}
    for f in sorted((Path(workdir) / "graph").glob("training_metrics_*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out[f.name] = [(r["global_step"], {**r["metrics"], **r["learning_rates"]}) for r in rows]
    return out


def _exports(workdir):
    out = {}
    for f in sorted((Path(workdir) / "export").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(workdir)}/{k}"] = v
    return out


def _ckpt_steps(workdir, stage):
    return sorted(p.name for p in (Path(workdir) / "checkpoints" / stage).iterdir())


def _files(workdir):
    return sorted(str(p.relative_to(workdir)) for p in Path(workdir).rglob("*")
                  if p.is_file() and "checkpoints" not in p.parts and "tb" not in p.parts)


def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path):
    port = _free_port()
    w2, w1 = tmp_path / "two", tmp_path / "one"
    procs = []
    for pid in range(2):
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        log = open(tmp_path / f"p{pid}.log", "w")  # noqa: SIM115 (closed below, after wait)
        procs.append((subprocess.Popen(_cmd(w2, "on"), cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(f"--- process {i}:\n{t[-3000:]}" for i, t in enumerate(logs))
    one = subprocess.run(_cmd(w1, "off"), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                         timeout=TIMEOUT, check=False)
    assert one.returncode == 0, one.stderr[-3000:]

    l1, l2 = _losses(w1), _losses(w2)
    assert sorted(l1) == ["training_metrics_flow.jsonl", "training_metrics_vae_warmup.jsonl"]
    assert sorted(l2) == sorted(l1)
    for name in l1:
        steps1 = [s for s, _ in l1[name]]
        assert steps1 and [s for s, _ in l2[name]] == steps1, name
        for (step, a), (_, b) in zip(l1[name], l2[name]):
            assert a.keys() == b.keys(), (name, step)
            for k in a:  # all-reduce order differs between gloo and one process: ulp-level only
                np.testing.assert_allclose(_num(b[k]), _num(a[k]), rtol=1e-5, atol=1e-7,
                                           err_msg=f"{name} step {step} {k}")
    e1, e2 = _exports(w1), _exports(w2)
    assert e1 and sorted(e2) == sorted(e1)
    for k in e1:
        # Attention key biases get an exactly-zero gradient (softmax ignores a per-query
        # constant): their values are rounding noise scaled up by Adam (~3e-5 measured), so
        # they only get a loose bound. Everything else agrees to ~4e-6; a wrong data split or
        # a host training on other weights moves parameters by ~lr x steps, about 1e-2.
        gradient_free = k.endswith(("k_lin.bias", "k_proj.bias"))
        np.testing.assert_allclose(e2[k], e1[k], rtol=1e-4, atol=2e-4 if gradient_free else 2e-5,
                                   err_msg=k)
    # The same run files, written once (process 0), and the same checkpoint steps.
    assert _files(w2) == _files(w1)
    for stage in ("vae_warmup", "flow"):
        assert _ckpt_steps(w2, stage) == _ckpt_steps(w1, stage), stage
    assert any("eval/psnr" in m for _, m in l2["training_metrics_flow.jsonl"])  # eval ran on 2 hosts

    # Another topology: the 2-process run, as if preempted right after its flow checkpoint at
    # step 8, resumes as 1 process and continues with the same numbers as the 1-process run.
    w3 = rewound_copy(w2, tmp_path / "resumed", "flow", 8)
    three = subprocess.run(_cmd(w3, "off"), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                           timeout=TIMEOUT, check=False)
    assert three.returncode == 0, three.stderr[-3000:]
    assert "resumed from step 8" in three.stdout, three.stdout[-3000:]
    l3 = _losses(w3)["training_metrics_flow.jsonl"]
    assert [s for s, _ in l3] == [s for s, _ in l1["training_metrics_flow.jsonl"]]
    for (step, a), (_, b) in zip(l1["training_metrics_flow.jsonl"], l3):
        assert a.keys() == b.keys(), step
        for k in a:
            np.testing.assert_allclose(_num(b[k]), _num(a[k]), rtol=1e-5, atol=1e-7,
                                       err_msg=f"step {step} {k}")
    e3 = _exports(w3)
    assert sorted(e3) == sorted(e1)
    for k in e1:
        gradient_free = k.endswith(("k_lin.bias", "k_proj.bias"))
        np.testing.assert_allclose(e3[k], e1[k], rtol=1e-4, atol=2e-4 if gradient_free else 2e-5,
                                   err_msg=k)



CKPT_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
pid, port, directory, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=600)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fluxflow_jax import checkpoint
mesh = Mesh(np.asarray(jax.devices()), ("data",))
w = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("data")))
shared = {"version": 1, "position": 3}
with checkpoint.Checkpointer(directory, async_save=False) as ck:
    ck.save(1, {"w": w}, {"host": pid, "cursor": [pid] * (pid + 1)}, {"m": 1}, force=True)
    ck.save(2, {"w": w + 1}, shared, {"m": 2}, force=True)
    s1, d1, _ = ck.restore({"w": w}, step=1)
    s2, d2, _ = ck.restore({"w": w}, step=2)
stored = [json.load(open(f"{directory}/{s}/data/metadata")) for s in (1, 2)]
json.dump({"d1": d1, "d2": d2, "stored": stored,
           "w2": np.asarray(jax.experimental.multihost_utils.process_allgather(s2["w"], tiled=True)).tolist()},
          open(out, "w"))
"""


def test_two_process_checkpoint_keeps_each_hosts_data_state(tmp_path):
    """Host-local loader states (webdataset cursors) come back per host; shared ones stay one."""
    script = tmp_path / "ck.py"
    script.write_text(CKPT_SCRIPT)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port),
                               str(tmp_path / "ck"), str(tmp_path / f"out{pid}.json")],
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    res = [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]
    for pid in range(2):
        assert res[pid]["d1"] == {"host": pid, "cursor": [pid] * (pid + 1)}
        assert res[pid]["d2"] == {"version": 1, "position": 3}
        assert res[pid]["w2"] == [float(i + 1) for i in range(8)]
    per_host, shared = res[0]["stored"]
    assert per_host == {"__per_process__": [{"host": 0, "cursor": [0]},
                                            {"host": 1, "cursor": [1, 1]}]}
    assert shared == {"version": 1, "position": 3}


AGREE_SCRIPT = """
import json, sys
import jax
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=600)
from fluxflow_jax import controls
# only process 1 saw the .stop file / the signal; only process 0 has eval values
flags = controls.agree({"stop": pid == 1, "signal": False, "checkpoint": pid == 0})
values = controls.same_on_every_process({"eval/psnr": 20.123456789012345 + pid, "eval/ssim": 0.5})
json.dump({"flags": flags, "values": values}, open(out, "w"))
"""


def _launch_pair(tmp_path, script_text, *args, devices=1):
    script = tmp_path / "s.py"
    script.write_text(script_text)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), str(port),
                               str(tmp_path / f"out{pid}.json"), *args],
                              cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    return [json.loads((tmp_path / f"out{pid}.json").read_text()) for pid in range(2)]


def test_two_process_hosts_take_the_same_stop_decisions(tmp_path):
    """A stop request seen by one host stops all; eval values (stop conditions, plateaus) are
    process 0's everywhere, exactly - otherwise hosts would part ways and deadlock."""
    res = _launch_pair(tmp_path, AGREE_SCRIPT)
    for r in res:
        assert r["flags"] == {"stop": True, "signal": False, "checkpoint": True}
        assert r["values"] == {"eval/psnr": 20.123456789012345, "eval/ssim": 0.5}


def _main_alone(tmp_path, pid, port, *extra, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "fluxflow_jax.main", "--config=configs/demo.py:test",
         f"--workdir={tmp_path / 'w'}", "--distributed=on", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={pid}", "--distributed_timeout=4", *extra],
        cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=timeout, check=False)


def test_two_process_start_errors_are_one_line_not_a_hang(tmp_path):
    port = _free_port()  # nothing listens there
    p = _main_alone(tmp_path, 1, port)  # a worker whose coordinator never comes up
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: process 1 of 2" in p.stderr and f"nothing answers at 127.0.0.1:{port}" in p.stderr
    p = _main_alone(tmp_path, 0, port)  # the coordinator whose worker never comes
    assert p.returncode == 2, p.stderr[-2000:]
    assert "error: process 0 of 2" in p.stderr and "not all 2 processes joined within 4 s" in p.stderr
    p = _main_alone(tmp_path, 2, port)  # an id outside the process count
    assert p.returncode == 2 and "--process_id must be in 0..1" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # nothing written before the processes met


def test_two_process_a_dead_host_stops_the_other_within_the_heartbeat(tmp_path):
    """kill -9 of one process: the survivor must not hang in its next collective."""
    port, logs, procs = _free_port(), [], []
    for pid in range(2):
        env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        logs.append(open(tmp_path / f"p{pid}.log", "w"))  # noqa: SIM115 (closed below)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fluxflow_jax.main", f"--workdir={tmp_path / 'w'}",
             "--distributed=on", "--distributed_heartbeat=5", "--config=configs/demo.py:test",
             "--config.batch_size=4", "--config.stages.vae_warmup.steps=100000",
             "--config.stage_order=('vae_warmup',)"],
            cwd=ROOT, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        log0 = tmp_path / "p0.log"
        deadline = time.monotonic() + 600
        while "compiling" not in log0.read_text() and time.monotonic() < deadline:
            assert procs[0].poll() is None, log0.read_text()[-3000:]
            time.sleep(0.5)
        procs[1].kill()
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=120)
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    text = log0.read_text()
    assert rc != 0 and waited < 90, (rc, waited, text[-3000:])
    assert "stopped sending heartbeats" in text and "another task died" in text, text[-3000:]


DAMAGED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from pathlib import Path
pid, port, out, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=600)
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fluxflow_jax import checkpoint
mesh = Mesh(np.asarray(jax.devices()), ("data",))
w = jax.device_put(jnp.arange(4.0), NamedSharding(mesh, P("data")))
with checkpoint.Checkpointer(directory, async_save=False) as ck:
    for s in (1, 2):
        ck.save(s, {"w": w + s}, {}, {"m": s}, force=True)
multihost_utils.sync_global_devices("saved")
if pid == 0:  # the shared step-2 folder gets half-copied: every file truncated
    for f in (directory / "2").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
multihost_utils.sync_global_devices("damaged")
with checkpoint.Checkpointer(directory, async_save=False) as ck:
    state, _, meta = ck.restore({"w": w})
    steps = ck.all_steps()
got = multihost_utils.process_allgather(state["w"], tiled=True)
json.dump({"meta": meta, "steps": steps, "w": np.asarray(got).tolist()}, open(out, "w"))
"""


def test_two_process_damaged_checkpoint_falls_back_on_every_host(tmp_path):
    """Both hosts find the shared latest step unreadable: one moves it aside, both restore the
    previous step (no host crashes on a folder the other already moved)."""
    res = _launch_pair(tmp_path, DAMAGED_SCRIPT, str(tmp_path / "ck"), devices=2)
    for r in res:
        assert r == {"meta": {"m": 1}, "steps": [1], "w": [1.0, 2.0, 3.0, 4.0]}
    moved = list((tmp_path / "ck.damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("2-")
