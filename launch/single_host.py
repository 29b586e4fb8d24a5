"""Train on one machine (a GPU box, a single-host TPU VM, a workstation), restarting on kills.

  python launch/single_host.py --config configs/phase1.py --workdir runs/phase1 \\
      [--devices 0,1] [--cpu-devices 8] [--max-restarts 3] [--dry-run] -- --config.batch_size=8

Runs ``python -m fluxflow_jax.main ... --distributed=off`` (one process drives all local
devices). When the process is killed, crashes or was stopped by SIGTERM (a preemptible VM's
notice), the same command runs again and resumes from the last checkpoint bit-identically, up
to ``--max-restarts`` times; it does not restart once the pipeline is finished or after a
``touch W/.stop``. ``--dry-run`` prints the exact command and environment and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # launch/ is a folder of scripts, not a package


def environment(a: argparse.Namespace) -> dict[str, str]:
    """The variables this launch sets (on top of the caller's environment)."""
    env = {}
    if a.devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = a.devices
    if a.cpu_devices:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.cpu_devices}"
    return env


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default=None,
                   help="GPUs to use, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES; default: all)")
    p.add_argument("--cpu-devices", type=int, default=0,
                   help="run on the CPU split into N devices (tests of sharding without a GPU)")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="re-runs after a kill, crash or SIGTERM (0: run once)")
    _common.add_training_args(p)
    a = p.parse_args(argv)
    a.overrides = _common.check_overrides(p, a.overrides)
    if a.max_restarts < 0 or a.cpu_devices < 0:
        p.error("--max-restarts and --cpu-devices must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    env = environment(a)
    cmd = _common.train_argv(a.python, a.config, a.workdir, a.overrides, "off")
    if a.dry_run:
        for k, v in env.items():
            print(f"export {k}={v}")
        _common.show(cmd, f"train (restarted up to {a.max_restarts} times after a kill, crash "
                          "or SIGTERM)")
        return 0
    full_env = {**os.environ, **env}
    rc = 0
    for attempt in range(a.max_restarts + 1):
        _common.show(cmd, f"attempt {attempt + 1}/{a.max_restarts + 1}")
        rc = subprocess.run(cmd, env=full_env, check=False).returncode
        if not _common.should_restart(rc, a.workdir):
            break
        print(f"# run ended with exit code {rc}, pipeline "
              f"{_common.pipeline_status(a.workdir)}: restarting (it resumes)", flush=True)
    status = _common.pipeline_status(a.workdir)
    print(f"# pipeline {status} (exit code {rc})", flush=True)
    return rc if rc != 0 else (0 if status in ("done", "stopped") else 1)


if __name__ == "__main__":
    sys.exit(main())
