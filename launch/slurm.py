"""Multi-node GPU training under SLURM: writes an sbatch script and submits it.

  python launch/slurm.py --nodes 4 --gpus-per-node 8 --config configs/phase1.py \\
      --workdir /shared/runs/phase1 [--per gpu] [--partition gpu] [--time 24:00:00] [--dry-run]

The job runs ``srun python -m fluxflow_jax.main ... --distributed=on`` with one process per node
(default, each process drives all its node's GPUs) or one per GPU (``--per gpu``). The first
node of the allocation is the coordinator; every process gets
``JAX_COORDINATOR_ADDRESS=<first node>:<port>``, ``JAX_NUM_PROCESSES=$SLURM_NTASKS``,
``JAX_PROCESS_ID=$SLURM_PROCID`` and ``JAX_LOCAL_DEVICE_IDS`` (which main passes to
``jax.distributed.initialize``). The device ids are explicit because JAX's own SLURM detection
gives each process only GPU ``$SLURM_LOCALID``: one process per node would then use one GPU.

The workdir must be on a filesystem all nodes share. With ``--requeue`` the job asks SLURM for a
SIGTERM ``--grace`` seconds before its time limit or preemption (main saves a checkpoint and
exits), then requeues itself while the pipeline is unfinished; the requeued job resumes
bit-identically from the checkpoint. ``--dry-run`` prints the script and the sbatch command.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # launch/ is a folder of scripts, not a package


def build_script(a: argparse.Namespace) -> str:
    """The sbatch script text."""
    per_gpu = a.per == "gpu"
    tasks_per_node = a.gpus_per_node if per_gpu else 1
    sb = [f"--job-name={a.job_name}", f"--nodes={a.nodes}",
          f"--ntasks-per-node={tasks_per_node}", f"--gpus-per-node={a.gpus_per_node}",
          f"--cpus-per-task={a.cpus_per_task}", f"--time={a.time}",
          f"--output={a.log_dir}/%x-%j.out"]
    if a.partition:
        sb.append(f"--partition={a.partition}")
    if a.account:
        sb.append(f"--account={a.account}")
    if a.requeue:
        sb += ["--requeue", f"--signal=TERM@{a.grace}"]
    sb += list(a.sbatch_arg)
    devices = "$SLURM_LOCALID" if per_gpu else ",".join(str(i) for i in range(a.gpus_per_node))
    train = _common.train_argv(a.python, a.config, a.workdir, a.overrides, "on")
    lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sb] + [
        "# Written by launch/slurm.py. One process per " + ("GPU" if per_gpu else "node") + ".",
        "set -euo pipefail",
        f"cd {shlex.quote(str(a.repo))}",
        *a.setup,
        "# The coordinator is process 0, on the first node of the allocation.",
        'COORD_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export JAX_COORDINATOR_ADDRESS=$COORD_HOST:{a.port}",
        "export JAX_NUM_PROCESSES=$SLURM_NTASKS",
        'echo "coordinator $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES processes"',
        "set +e",
        # single quotes: SLURM_PROCID / SLURM_LOCALID are per task, expanded inside each task
        "srun --kill-on-bad-exit=1 bash -c " + shlex.quote(
            "export JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=" + devices +
            " && exec " + _common.shell_line(train)),
        "rc=$?",
        "set -e",
    ]
    if a.requeue:
        check = [a.python, "launch/_common.py", "should-restart", a.workdir]
        lines += [
            "# Unfinished after a SIGTERM (time limit, preemption) or a crash: requeue; resumes.",
            "# Not after the pipeline finished or a W/.stop request.",
            f"if {_common.shell_line(check)} \"$rc\"; then",
            '  echo "pipeline unfinished (exit code $rc): requeueing $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--per", choices=["node", "gpu"], default="node",
                   help="one process per node (all its GPUs) or one per GPU")
    p.add_argument("--port", type=int, default=12355, help="coordinator port on the first node")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", default="24:00:00", help="SLURM time limit")
    p.add_argument("--cpus-per-task", type=int, default=16)
    p.add_argument("--job-name", default="fluxflow_jax")
    p.add_argument("--requeue", action="store_true",
                   help="SIGTERM --grace s before the limit, requeue while unfinished")
    p.add_argument("--grace", type=int, default=180, help="seconds between SIGTERM and the kill")
    p.add_argument("--setup", action="append", default=[],
                   help="shell line run before training on the first node, e.g. "
                        "'source .venv/bin/activate' (repeatable)")
    p.add_argument("--sbatch-arg", action="append", default=[],
                   help="extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)")
    p.add_argument("--repo", default=str(_common.REPO_ROOT),
                   help="checkout on the shared filesystem the job runs in")
    p.add_argument("--log-dir", default="slurm_logs", help="where SLURM writes the job output")
    p.add_argument("--script", default=None,
                   help="where to write the sbatch script (default: <log-dir>/<job-name>.sbatch)")
    p.add_argument("--sbatch", default="sbatch", help=argparse.SUPPRESS)
    _common.add_training_args(p)
    a = p.parse_args(argv)
    a.overrides = _common.check_overrides(p, a.overrides)
    if a.nodes < 1 or a.gpus_per_node < 1:
        p.error("--nodes and --gpus-per-node must be >= 1")
    if not 1024 <= a.port <= 65535:
        p.error(f"--port {a.port} must be in [1024, 65535]")
    a.script = a.script or f"{a.log_dir}/{a.job_name}.sbatch"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    text = build_script(a)
    cmd = [a.sbatch, a.script]
    if a.dry_run:
        print(f"# sbatch script ({a.script}):")
        print(text, end="")
        _common.show(cmd, "submit")
        return 0
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    Path(a.script).write_text(text)
    try:
        return subprocess.run(cmd, check=False).returncode
    except FileNotFoundError:
        print(f"error: {a.sbatch!r} not found: run this on a SLURM login node "
              f"(the script is written to {a.script})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
