"""launch/*.py: every dry run as the user calls it (a subprocess), checking the exact commands.

Dry runs must run nothing: the scripts are pointed at gcloud/sbatch stand-ins that do not
exist, so any attempt to execute one would fail the run. The restart decision the launchers
share is checked on real pipeline_state.json files.
"""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import _common


def _launch(script, *args, ok=True):
    p = subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def _commands(out):
    """The '+ ' lines of a dry run, each split back into argv."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def _main_argv(argv):
    i = argv.index("fluxflow_jax.main")
    return argv[i - 2:]


def test_tpu_dry_run_prints_create_install_and_train_on_all_workers(tmp_path):
    p = _launch("tpu_vm.py", "--name", "ff", "--zone", "us-central2-b", "--project", "proj",
                "--accelerator-type", "v4-32", "--spot", "--config", "configs/phase1.py",
                "--workdir", "gs://bkt/runs/p1", "--gcloud", str(tmp_path / "no-gcloud"),
                "--dry-run", "--", "--config.batch_size=64")
    cmds = _commands(p.stdout)
    verbs = [c[4] for c in cmds]
    assert verbs == ["describe", "delete", "create", "scp", "ssh", "ssh", "ssh"]
    where = ["--zone=us-central2-b", "--project=proj"]
    for c in cmds:
        assert all(w in c for w in where), c
    create = cmds[2]
    assert create[5] == "ff" and "--accelerator-type=v4-32" in create and "--spot" in create
    for c in cmds[3:]:
        assert "--worker=all" in c
    install = cmds[4][-1]
    assert install.startswith("--command=") and "pip install" in install and "jax[tpu]" in install
    assert "gcsfuse --implicit-dirs bkt /mnt/gcs/bkt" in cmds[5][-1]
    train = shlex.split(cmds[6][-1][len("--command="):].split("&&")[-1])
    assert train == ["python", "-m", "fluxflow_jax.main", "--config=configs/phase1.py",
                     "--workdir=/mnt/gcs/bkt/runs/p1", "--distributed=on",
                     "--config.batch_size=64"]
    assert "at most 20 times" in p.stdout


def test_tpu_dry_run_installs_a_package_instead_of_the_checkout(tmp_path):
    p = _launch("tpu_vm.py", "--name", "ff", "--zone", "z", "--accelerator-type", "v4-8",
                "--config", "configs/demo.py", "--workdir", "runs/demo", "--package",
                "fluxflow_jax @ git+https://example.com/fluxflow_jax", "--dry-run")
    cmds = _commands(p.stdout)
    assert [c[4] for c in cmds] == ["describe", "delete", "create", "ssh", "ssh"]
    assert "'fluxflow_jax @ git+https://example.com/fluxflow_jax'" in cmds[3][-1]
    assert "--workdir=runs/demo" in cmds[4][-1] and "cd " not in cmds[4][-1]


def test_tpu_launch_refuses_a_local_workdir_on_a_multi_host_slice():
    p = _launch("tpu_vm.py", "--name", "ff", "--zone", "z", "--accelerator-type", "v5litepod-16",
                "--config", "configs/demo.py", "--workdir", "runs/demo", "--dry-run", ok=False)
    assert p.returncode == 2 and p.stdout == ""
    assert "--workdir 'runs/demo' is local" in p.stderr and "4 hosts" in p.stderr
    assert "gs://BUCKET/DIR" in p.stderr


@pytest.mark.parametrize("acc,hosts", [("v4-8", 1), ("v4-32", 4), ("v5p-128", 16),
                                       ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-256", 64),
                                       ("tpu7x-xyz", None)])
def test_launch_tpu_hosts_per_slice(acc, hosts):
    import tpu_vm
    assert tpu_vm.hosts_for(acc) == hosts


def _slurm(*args, tmp_path):
    return _launch("slurm.py", "--config", "configs/phase1.py", "--workdir", "/shared/p1",
                   "--sbatch", str(tmp_path / "no-sbatch"), "--log-dir", str(tmp_path / "logs"),
                   "--dry-run", *args)


def _srun_env_and_argv(script):
    line = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    srun = shlex.split(line)
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "bash", "-c"]
    inner = srun[4]
    exports, _, train = inner.partition(" && exec ")
    env = dict(kv.split("=", 1) for kv in shlex.split(exports)[1:])
    return env, shlex.split(train)


def test_slurm_dry_run_one_process_per_node(tmp_path):
    p = _slurm("--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--port", "23456",
               "--", "--config.batch_size=32", tmp_path=tmp_path)
    out = p.stdout
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --partition=gpu" in out
    assert 'COORD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
    assert "export JAX_COORDINATOR_ADDRESS=$COORD_HOST:23456" in out
    assert "export JAX_NUM_PROCESSES=$SLURM_NTASKS" in out
    env, train = _srun_env_and_argv(out)
    # every GPU of the node, explicitly (JAX's SLURM detection would give GPU $SLURM_LOCALID only)
    assert env == {"JAX_PROCESS_ID": "$SLURM_PROCID", "JAX_LOCAL_DEVICE_IDS": "0,1,2,3,4,5,6,7"}
    assert train == ["python", "-m", "fluxflow_jax.main", "--config=configs/phase1.py",
                     "--workdir=/shared/p1", "--distributed=on", "--config.batch_size=32"]
    assert "requeue" not in out
    assert _commands(out) == [[str(tmp_path / "no-sbatch"), str(tmp_path / "logs/fluxflow_jax.sbatch")]]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_slurm_dry_run_one_process_per_gpu_with_requeue(tmp_path):
    p = _slurm("--nodes", "2", "--gpus-per-node", "4", "--per", "gpu", "--requeue",
               "--grace", "120", "--setup", "source /shared/venv/bin/activate", tmp_path=tmp_path)
    out = p.stdout
    assert "#SBATCH --ntasks-per-node=4" in out and "#SBATCH --nodes=2" in out
    assert "#SBATCH --requeue" in out and "#SBATCH --signal=TERM@120" in out
    env, train = _srun_env_and_argv(out)
    assert env == {"JAX_PROCESS_ID": "$SLURM_PROCID", "JAX_LOCAL_DEVICE_IDS": "$SLURM_LOCALID"}
    assert "--distributed=on" in train
    lines = out.splitlines()
    assert lines.index("source /shared/venv/bin/activate") < next(
        i for i, ln in enumerate(lines) if ln.startswith("srun "))
    assert 'if python launch/_common.py should-restart /shared/p1 "$rc"; then' in out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out


def test_slurm_script_is_valid_bash(tmp_path):
    p = _slurm("--nodes", "2", "--requeue", tmp_path=tmp_path)
    script = p.stdout.split("\n", 1)[1].rsplit("# submit", 1)[0]
    assert script.startswith("#!/bin/bash\n")
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True,
                           check=False)
    assert check.returncode == 0, check.stderr


def test_single_host_dry_run(tmp_path):
    p = _launch("single_host.py", "--config", "configs/demo.py:test", "--workdir",
                str(tmp_path / "w"), "--cpu-devices", "8", "--max-restarts", "5", "--dry-run",
                "--", "--config.batch_size=8")
    assert "export XLA_FLAGS=--xla_force_host_platform_device_count=8" in p.stdout
    assert "export JAX_PLATFORMS=cpu" in p.stdout
    (cmd,) = _commands(p.stdout)
    assert cmd == ["python", "-m", "fluxflow_jax.main", "--config=configs/demo.py:test",
                   f"--workdir={tmp_path / 'w'}", "--distributed=off", "--config.batch_size=8"]
    assert "up to 5 times" in p.stdout
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("script", ["single_host.py", "slurm.py", "tpu_vm.py"])
def test_launch_rejects_a_pass_through_flag_main_does_not_have(script):
    extra = {"slurm.py": ["--nodes", "2"], "tpu_vm.py": ["--name", "n", "--zone", "z"],
             "single_host.py": []}[script]
    p = _launch(script, *extra, "--config", "c.py", "--workdir", "gs://b/w", "--dry-run", "--",
                "--batch_size=8", ok=False)
    assert p.returncode == 2
    assert "'--batch_size=8' is not a main flag; use --config.KEY=VALUE" in p.stderr


def _workdir(tmp_path, finished, last_stop=None):
    (tmp_path / "config.json").write_text(json.dumps({"stage_order": ["a", "b"]}))
    state = {"finished": finished, "current": None}
    if last_stop is not None:
        state["last_stop"] = last_stop
    (tmp_path / "pipeline_state.json").write_text(json.dumps(state))
    return tmp_path


@pytest.mark.parametrize("finished,last_stop,rc,status,restart", [
    (["a", "b"], None, 0, "done", False),
    (["a", "b"], {"reason": "signal"}, 0, "done", False),
    (["a"], {"reason": "signal", "interrupted": True}, 0, "preempted", True),
    (["a"], {"stop_requested": True, "interrupted": True}, 0, "preempted", True),
    (["a"], {"reason": ".stop file", "interrupted": True}, 0, "stopped", False),
    (["a"], None, -9, "unfinished", True),
    (["a"], None, 1, "unfinished", True),
])
def test_launch_restart_decision(tmp_path, finished, last_stop, rc, status, restart):
    w = _workdir(tmp_path, finished, last_stop)
    assert _common.pipeline_status(w) == status
    assert _common.should_restart(rc, w) is restart
    p = subprocess.run([sys.executable, "launch/_common.py", "should-restart", str(w), str(rc)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == (0 if restart else 1), p.stdout + p.stderr


def test_launch_restart_decision_without_a_run_yet(tmp_path):
    assert _common.pipeline_status(tmp_path / "never") == "unfinished"
    assert _common.should_restart(1, tmp_path / "never") is True


FAKE_MAIN = """#!{python}
# Stand-in for python: counts its runs; the first is killed mid-run (SIGKILL), the second
# finishes the pipeline. Records every argv so the test sees what the launcher ran.
import json, os, signal, sys
from pathlib import Path
log = Path({log!r})
runs = json.loads(log.read_text()) if log.exists() else []
runs.append(sys.argv[1:])
log.write_text(json.dumps(runs))
w = Path([a for a in sys.argv if a.startswith("--workdir=")][0].split("=", 1)[1])
w.mkdir(parents=True, exist_ok=True)
(w / "config.json").write_text(json.dumps({{"stage_order": ["a", "b"]}}))
finished = ["a"] if len(runs) == 1 else ["a", "b"]
(w / "pipeline_state.json").write_text(json.dumps({{"finished": finished, "current": None}}))
if len(runs) == 1:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_single_host_launch_restarts_a_killed_run_until_done(tmp_path):
    log = tmp_path / "runs.json"
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_MAIN.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    p = _launch("single_host.py", "--config", "configs/demo.py:test", "--workdir",
                str(tmp_path / "w"), "--python", str(fake), "--max-restarts", "3")
    runs = json.loads(log.read_text())
    assert len(runs) == 2 and runs[0] == runs[1]  # the same command again: it resumes
    assert runs[0][:2] == ["-m", "fluxflow_jax.main"] and "--distributed=off" in runs[0]
    assert "restarting (it resumes)" in p.stdout and "# pipeline done (exit code 0)" in p.stdout


def test_single_host_launch_gives_up_after_max_restarts(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nsys.exit(7)\n")
    fake.chmod(0o755)
    p = _launch("single_host.py", "--config", "c.py", "--workdir", str(tmp_path / "w"),
                "--python", str(fake), "--max-restarts", "2", ok=False)
    assert p.returncode == 7
    assert p.stdout.count("# attempt ") == 3


def _main(*args):
    import os
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "fluxflow_jax.main",
                           "--config=configs/demo.py:test", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_launch_main_unreachable_coordinator_is_one_line_naming_the_process(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _main(f"--workdir={tmp_path / 'w'}", "--distributed=on",
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
              "--distributed_timeout=2")
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert err[-1].startswith(f"error: process 1 of 2, coordinator 127.0.0.1:{port}: nothing "
                              f"answers at 127.0.0.1:{port} after 2 s")
    assert "Traceback" not in p.stderr and not (tmp_path / "w").exists()


def test_launch_main_distributed_on_without_a_cluster_says_what_to_pass(tmp_path):
    p = _main(f"--workdir={tmp_path / 'w'}", "--distributed=on")
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --distributed=on: process ? of ?")
    assert "--coordinator_address, --num_processes and --process_id" in last


FAKE_GCLOUD = """#!{python}
# Stand-in for gcloud: a TPU that does not exist yet, is preempted during the first training
# run and finishes the second. Logs every call.
import json, sys
from pathlib import Path
d = Path({d!r})
calls = json.loads((d / "calls.json").read_text()) if (d / "calls.json").exists() else []
calls.append(sys.argv[1:])
(d / "calls.json").write_text(json.dumps(calls))
state = (d / "state").read_text() if (d / "state").exists() else "NOT_FOUND"
verb = sys.argv[4]
if verb == "describe":
    if state == "NOT_FOUND":
        sys.exit(1)
    print(state)
elif verb == "create":
    (d / "state").write_text("READY")
elif verb == "delete":
    (d / "state").unlink()
elif verb == "ssh" and "fluxflow_jax.main" in sys.argv[-1]:
    runs = len([c for c in calls if c[3] == "ssh" and "fluxflow_jax.main" in c[-1]])
    if runs == 1:
        (d / "state").write_text("PREEMPTED")
        sys.exit(255)
"""


def test_tpu_launch_recreates_a_preempted_tpu_and_reruns_the_same_command(tmp_path):
    fake = tmp_path / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable, d=str(tmp_path)))
    fake.chmod(0o755)
    p = _launch("tpu_vm.py", "--name", "ff", "--zone", "z", "--accelerator-type", "v4-8",
                "--config", "configs/demo.py", "--workdir", "runs/demo", "--package", "pkg",
                "--gcloud", str(fake))
    calls = json.loads((tmp_path / "calls.json").read_text())
    verbs = [c[3] for c in calls]
    assert verbs == ["describe", "create", "describe", "ssh", "ssh",  # create, install, train
                     "describe",                                      # -> PREEMPTED
                     "describe", "delete", "create", "describe", "ssh", "ssh",
                     "describe"]                                      # READY, rc 0: done
    trains = [c for c in calls if c[3] == "ssh" and "fluxflow_jax.main" in c[-1]]
    assert len(trains) == 2 and trains[0] == trains[1]
    assert "preempted" in p.stdout
