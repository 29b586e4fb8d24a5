"""Train on a Cloud TPU VM or pod slice: create-or-reuse, install on every worker, run, restart.

  python launch/tpu_vm.py --name ff-v4 --zone us-central2-b --accelerator-type v4-32 \\
      --config configs/phase1.py --workdir gs://my-bucket/runs/phase1 --spot [--dry-run] \\
      -- --config.batch_size=64

What it does (``--dry-run`` prints exactly these commands and runs none):

1. ``gcloud compute tpus tpu-vm describe``; ``create`` only when the TPU does not exist (a
   preempted spot TPU is deleted and created again);
2. copies this checkout to every worker (``scp --worker=all``) and ``pip install``s it there with
   ``jax[tpu]`` (or installs ``--package``, e.g. a git URL, instead of the copy);
3. a ``gs://`` workdir is mounted with gcsfuse at the same path on every worker, because a pod
   slice's hosts must share one workdir (Orbax writes one checkpoint from all hosts; process 0
   writes the stage files the others read);
4. starts ``python -m fluxflow_jax.main ... --distributed=on`` on all workers at once (JAX finds
   the coordinator, process count and ids from the TPU metadata itself);
5. when the TPU was preempted (its state is no longer READY) it recreates it and runs the same
   command again, which resumes from the last checkpoint bit-identically; up to ``--max-restarts``.
   A failure on a healthy TPU is not retried (it is a bug or a config error, not preemption).
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # launch/ is a folder of scripts, not a package

REMOTE_REPO = "~/fluxflow_jax"
MOUNT_ROOT = "/mnt/gcs"


def hosts_for(accelerator_type: str) -> int | None:
    """Worker VMs of a slice type (v4-32 -> 4); None when the family is unknown.

    v2-v5p count TensorCores (8 per host); v5e/v6e (``v5litepod-N``, ``v6e-N``) count chips,
    single host up to 8, then 4 chips per host.
    """
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod)-(\d+)", accelerator_type)
    if not m:
        return None
    family, n = m.group(1), int(m.group(2))
    if family in ("v5litepod", "v5e", "v6e"):
        return 1 if n <= 8 else n // 4
    return max(1, n // 8)


def gcs_mount(workdir: str) -> tuple[str, str] | None:
    """(bucket, path on the workers) for a ``gs://bucket/dir`` workdir, else None."""
    if not workdir.startswith("gs://"):
        return None
    bucket, _, rest = workdir[len("gs://"):].partition("/")
    if not bucket:
        raise SystemExit(f"error: --workdir {workdir!r} names no bucket; use gs://BUCKET/DIR")
    return bucket, f"{MOUNT_ROOT}/{bucket}" + (f"/{rest}" if rest else "")


class Gcloud:
    """The gcloud command lines for one TPU (one place that knows the flags)."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.where = [f"--zone={a.zone}"] + ([f"--project={a.project}"] if a.project else [])

    def tpu(self, verb: str, *extra: str) -> list[str]:
        return [self.a.gcloud, "compute", "tpus", "tpu-vm", verb, self.a.name, *self.where, *extra]

    def describe(self) -> list[str]:
        return self.tpu("describe", "--format=value(state)")

    def create(self) -> list[str]:
        extra = [f"--accelerator-type={self.a.accelerator_type}", f"--version={self.a.version}"]
        if self.a.spot:
            extra.append("--spot")
        return self.tpu("create", *extra)

    def delete(self) -> list[str]:
        return self.tpu("delete", "--quiet")

    def ssh_all(self, command: str) -> list[str]:
        return self.tpu("ssh", "--worker=all", f"--command={command}")

    def scp_repo(self) -> list[str]:
        return [self.a.gcloud, "compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=all",
                *self.where, str(_common.REPO_ROOT), f"{self.a.name}:{REMOTE_REPO}"]


def install_commands(a: argparse.Namespace, g: Gcloud) -> list[list[str]]:
    """Copy + pip install on every worker (or pip install ``--package``), gcsfuse mount."""
    py = shlex.quote(a.python)
    cmds = []
    if a.package:
        pip = f"{py} -m pip install -U 'jax[tpu]' {shlex.quote(a.package)}"
    else:
        cmds.append(g.scp_repo())
        pip = f"{py} -m pip install -U 'jax[tpu]' -e {REMOTE_REPO}"
    cmds.append(g.ssh_all(pip))
    mount = gcs_mount(a.workdir)
    if mount:
        bucket, _ = mount
        target = f"{MOUNT_ROOT}/{bucket}"
        cmds.append(g.ssh_all(
            f"sudo mkdir -p {target} && sudo chown $USER {target} && "
            f"(mountpoint -q {target} || gcsfuse --implicit-dirs {bucket} {target})"))
    return cmds


def train_command(a: argparse.Namespace, g: Gcloud) -> list[str]:
    mount = gcs_mount(a.workdir)
    workdir = mount[1] if mount else a.workdir
    argv = _common.train_argv(a.python, a.config, workdir, a.overrides, "on")
    cd = f"cd {REMOTE_REPO} && " if not a.package else ""
    return g.ssh_all(cd + _common.shell_line(argv))


def tpu_state(g: Gcloud) -> str:
    """READY, CREATING, PREEMPTED, ... or NOT_FOUND."""
    p = _common.run(g.describe(), check=False, capture=True)
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "NOT_FOUND"


def ensure_tpu(a: argparse.Namespace, g: Gcloud) -> None:
    """Reuse a READY TPU; delete a preempted one; create it when missing; wait for READY."""
    state = tpu_state(g)
    if state in ("PREEMPTED", "TERMINATED", "STOPPED"):
        _common.run(g.delete(), note=f"TPU {a.name} is {state}: recreating it")
        state = "NOT_FOUND"
    if state == "NOT_FOUND":
        _common.run(g.create(), note=f"TPU {a.name} does not exist: creating it")
    for _ in range(120):
        if tpu_state(g) == "READY":
            return
        time.sleep(10)
    raise SystemExit(f"error: TPU {a.name} did not become READY in 20 minutes; "
                     f"check `{_common.shell_line(g.describe())}`")


def dry_run(a: argparse.Namespace, g: Gcloud) -> int:
    _common.show(g.describe(), "state of the TPU (reused when READY)")
    _common.show(g.delete(), "only if that state is PREEMPTED/TERMINATED")
    _common.show(g.create(), "only if the TPU does not exist (or was deleted above)")
    for c in install_commands(a, g):
        _common.show(c, "install on every worker")
    _common.show(train_command(a, g), "train on every worker at once")
    print(f"# restart loop: when the TPU is no longer READY after the run, recreate it, "
          f"reinstall and run the same command again (resumes); at most {a.max_restarts} times")
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    p.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
    p.add_argument("--spot", action="store_true", help="create a spot (preemptible) TPU")
    p.add_argument("--package", default=None,
                   help="pip requirement to install instead of copying this checkout, e.g. "
                        "'fluxflow_jax @ git+https://github.com/ORG/fluxflow_jax'")
    p.add_argument("--max-restarts", type=int, default=20,
                   help="recreate-and-resume cycles after preemption")
    p.add_argument("--skip-install", action="store_true",
                   help="reuse what the workers have installed (first attempt only)")
    p.add_argument("--gcloud", default="gcloud", help=argparse.SUPPRESS)
    _common.add_training_args(p)
    a = p.parse_args(argv)
    a.overrides = _common.check_overrides(p, a.overrides)
    hosts = hosts_for(a.accelerator_type)
    if not gcs_mount(a.workdir) and (hosts is None or hosts > 1):
        p.error(f"--workdir {a.workdir!r} is local, but --accelerator-type "
                f"{a.accelerator_type} has {hosts or 'an unknown number of'} hosts that must "
                "share one workdir; use --workdir gs://BUCKET/DIR")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    g = Gcloud(a)
    if a.dry_run:
        return dry_run(a, g)
    for attempt in range(a.max_restarts + 1):
        ensure_tpu(a, g)
        if not (a.skip_install and attempt == 0):
            for c in install_commands(a, g):
                _common.run(c)
        rc = _common.run(train_command(a, g), check=False).returncode
        state = tpu_state(g)
        if state == "READY":
            if rc == 0:
                return 0
            print(f"error: training exited with code {rc} on a healthy TPU (not a preemption); "
                  "see the output above, fix it and run this command again", file=sys.stderr)
            return rc
        print(f"# TPU {a.name} is {state} (preempted); restart {attempt + 1}/{a.max_restarts}",
              flush=True)
    print(f"error: still preempted after {a.max_restarts} restarts", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
