"""Shared pieces of the launch scripts: the training command, printing vs running, restarts.

Every launcher builds its commands as argv lists first and only then either prints them
(``--dry-run``: the exact shell lines, nothing is executed) or runs them, so what a dry run shows
is what a real run does, and tests can check it without a TPU, a cluster or gcloud.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
Argv = list[str]


def add_training_args(p: argparse.ArgumentParser) -> None:
    """--config/--workdir/--dry-run and pass-through ``--config.x=y`` overrides (after ``--``)."""
    p.add_argument("--config", required=True,
                   help="config file as main takes it, e.g. configs/phase1.py or configs/demo.py:test")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, exports, ...)")
    p.add_argument("--python", default="python", help="python executable on the machines")
    p.add_argument("--dry-run", action="store_true",
                   help="print the exact commands this would run and run nothing")
    p.add_argument("overrides", nargs="*", metavar="--config.KEY=VALUE",
                   help="extra flags for fluxflow_jax.main; put them after '--'")


def check_overrides(p: argparse.ArgumentParser, overrides: Sequence[str]) -> list[str]:
    """Only main's own flags may be passed through; a typo fails here, not on 64 hosts."""
    allowed = ("--config.", "--compilation_cache=", "--distributed_timeout=", "--verbosity=", "-v=")
    for o in overrides:
        if not o.startswith(allowed):
            p.error(f"pass-through argument {o!r} is not a main flag; use --config.KEY=VALUE "
                    f"(after '--'), --compilation_cache=DIR or --distributed_timeout=S")
    return list(overrides)


def train_argv(python: str, config: str, workdir: str, overrides: Sequence[str],
               distributed: str, *extra: str) -> Argv:
    """``python -m fluxflow_jax.main`` with the given settings (the one command every launcher runs)."""
    return [python, "-m", "fluxflow_jax.main", f"--config={config}", f"--workdir={workdir}",
            f"--distributed={distributed}", *extra, *overrides]


def shell_line(argv: Sequence[str]) -> str:
    """One argv as a copy-pasteable shell line."""
    return shlex.join([str(a) for a in argv])


def show(argv: Sequence[str], note: str = "") -> None:
    """Print a command the way a dry run reports it: '+ <shell line>' (and a '#' note)."""
    if note:
        print(f"# {note}")
    print("+ " + shell_line(argv), flush=True)


def run(argv: Sequence[str], *, check: bool = True, capture: bool = False,
        dry_run: bool = False, note: str = "") -> subprocess.CompletedProcess:
    """Print the command; unless ``dry_run``, run it (raising SystemExit with a one-line message
    naming the command when ``check`` and it fails)."""
    show(argv, note)
    if dry_run:
        return subprocess.CompletedProcess(list(argv), 0, "", "")
    try:
        p = subprocess.run(list(argv), text=True, capture_output=capture, check=False)
    except FileNotFoundError:
        raise SystemExit(f"error: {argv[0]!r} not found; install it or put it on PATH") from None
    if check and p.returncode != 0:
        raise SystemExit(f"error: command failed with exit code {p.returncode}: "
                         f"{shell_line(argv)[:300]}")
    return p


# ----------------------------------------------------------------------------------------------
# Restarts: rely on exact resume (re-running the same command continues where it stopped)


def pipeline_status(workdir: str | Path) -> str:
    """'done', 'stopped' (the user asked: .stop file), 'preempted' (signal), or 'unfinished'.

    Read from the run's own files (``config.json`` for the stage order, ``pipeline_state.json``
    for progress), so a restart decision needs nothing but the workdir.
    """
    wd = Path(workdir)
    try:
        order = json.loads((wd / "config.json").read_text())["stage_order"]
        state = json.loads((wd / "pipeline_state.json").read_text())
    except (OSError, KeyError, ValueError):
        return "unfinished"
    if all(s in state.get("finished", []) for s in order):
        return "done"
    last = state.get("last_stop") or {}
    reason = str(last.get("reason", ""))
    if reason.endswith(".stop file"):
        return "stopped"
    if reason == "signal" or last.get("stop_requested"):  # SIGTERM mid-stage or after its end
        return "preempted"
    return "unfinished"


def should_restart(returncode: int, workdir: str | Path) -> bool:
    """Restart after a kill, crash or SIGTERM (preemption); not when done or stopped on request."""
    status = pipeline_status(workdir)
    if status in ("done", "stopped"):
        return False
    return returncode != 0 or status == "preempted"


def main_cli() -> None:
    """``python launch/_common.py status W`` prints the status (exit 0 only when done);
    ``python launch/_common.py should-restart W RC`` exits 0 when the run should be restarted
    (used by the SLURM script to decide whether to requeue itself)."""
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "status":
        status = pipeline_status(args[1])
        print(status)
        raise SystemExit(0 if status == "done" else 1)
    if len(args) == 3 and args[0] == "should-restart" and args[2].lstrip("-").isdigit():
        restart = should_restart(int(args[2]), args[1])
        print(f"{pipeline_status(args[1])}: {'restart' if restart else 'no restart'}")
        raise SystemExit(0 if restart else 1)
    raise SystemExit("usage: python launch/_common.py status WORKDIR | "
                     "should-restart WORKDIR EXIT_CODE")


if __name__ == "__main__":
    main_cli()
