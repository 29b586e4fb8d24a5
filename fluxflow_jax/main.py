"""Entry point: ``python -m fluxflow_jax.main --config=configs/phase1.py[:arg] --workdir=runs/x``.

``--config.a.b=value`` overrides any config key (the config is locked: a misspelt key fails).
``--validate`` prints the stage plan and exits. ``--distributed=auto|on|off`` calls
``jax.distributed.initialize()`` before anything touches a device (TPU pods, multi-node GPU);
outside SLURM / Cloud TPU give ``--coordinator_address --num_processes --process_id`` (or the
``JAX_*`` variables of the same meaning; ``launch/`` sets them). All hosts need one shared workdir.
Stop controls while running: ``touch W/.pause`` (pause until removed), ``W/.checkpoint``
(save now + samples), ``W/.stop`` (save and exit); SIGTERM/SIGINT save and exit too.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

# Importing the package touches no device, so jax.distributed can still be initialised first.
from fluxflow_jax import checkpoint, data, interop, pipeline, stages, weights, xla
from fluxflow_jax import controls as controls_lib

# What a user can fix: reported in one line (exit 2); anything else is an internal error and keeps
# its traceback. --verbose shows tracebacks for these too.
USER_ERRORS = (stages.ConfigError, weights.WeightsError, interop.InteropError,
               checkpoint.CheckpointMismatchError, checkpoint.CheckpointError, data.DataError,
               FileNotFoundError, NotADirectoryError, PermissionError)

FLAGS = flags.FLAGS


def _env_int(name: str) -> int | None:
    """An integer environment variable as a flag default (None when unset or empty)."""
    v = os.environ.get(name, "").strip()
    if v and not v.isdigit():
        raise SystemExit(f"error: ${name}={v!r} must be a non-negative integer (or unset)")
    return int(v) if v else None


config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, exports, metrics, samples).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): 'auto' does it when a multi-process "
                  "environment is detected (TPU pod, SLURM, a coordinator address).")
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                    "host:port of process 0's coordinator for --distributed (default: "
                    "$JAX_COORDINATOR_ADDRESS, else detected from SLURM / the TPU VM).")
flags.DEFINE_integer("num_processes", _env_int("JAX_NUM_PROCESSES"),
                     "Number of processes for --distributed (default: $JAX_NUM_PROCESSES, "
                     "else detected).")
flags.DEFINE_integer("process_id", _env_int("JAX_PROCESS_ID"),
                     "This process's id in [0, num_processes) (default: $JAX_PROCESS_ID, else "
                     "detected).")
flags.DEFINE_integer("distributed_heartbeat", 100,
                     "Seconds without a heartbeat after which a process counts as dead and the "
                     "others stop (they keep their last checkpoint; rerun all to resume).")
flags.DEFINE_integer("distributed_timeout", 300,
                     "Seconds to wait for all processes to reach the coordinator before failing.")
flags.DEFINE_bool("validate", False, "Print the stage plan and exit without training.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for user errors too (config, data, files).")
flags.DEFINE_string("compilation_cache",
                    xla.cache_path(),
                    "Persistent XLA compilation cache directory ('' or 'none' disables it). "
                    "A restarted or repeated run skips recompiling its step functions.")


def _multiprocess_env() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


class DistributedInitError(RuntimeError):
    """jax.distributed.initialize cannot succeed; the message says which process and what to check."""


def _hint(coordinator_address, num_processes, process_id) -> str:
    return (f"process {process_id if process_id is not None else '?'} of "
            f"{num_processes if num_processes is not None else '?'}, coordinator "
            f"{coordinator_address or '(auto-detected)'}")


def wait_for_coordinator(address: str, timeout_s: float, hint: str) -> None:
    """Block until ``host:port`` accepts TCP connections; DistributedInitError after ``timeout_s``.

    JAX's client aborts the whole process (a C++ fatal error, no Python exception) when it
    cannot register with the coordinator, so a non-coordinator process checks reachability
    itself first and can then fail with one readable line.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedInitError(f"--coordinator_address={address!r} must be HOST:PORT ({hint})")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"{hint}: nothing answers at {address} after {timeout_s:g} s ({e}); check "
                    "that process 0 is running and started its coordinator, that this host can "
                    "reach that address and port (firewall), and that every process got the "
                    "same --coordinator_address") from None
            time.sleep(1.0)


def maybe_initialize_distributed(mode: str, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None,
                                 timeout_s: int = 300, heartbeat_s: int = 100) -> bool:
    """Initialise multi-host JAX first thing (before any device use). Returns whether it did.

    Unset values are left to JAX's own detection (SLURM, Cloud TPU, Open MPI, ...); a plain
    machine needs all three (the launch scripts in ``launch/`` pass them as JAX_* variables).
    """
    explicit = bool(coordinator_address) or (num_processes or 1) > 1
    if not (mode == "on" or (mode == "auto" and (explicit or _multiprocess_env()))):
        return False
    hint = _hint(coordinator_address, num_processes, process_id)
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise DistributedInitError(f"{hint}: --process_id must be in 0..{num_processes - 1} (each "
                                   "process its own id, every process the same --num_processes)")
    if coordinator_address and process_id not in (None, 0):
        wait_for_coordinator(coordinator_address, timeout_s, hint)
    elif process_id == 0:
        print(f"[distributed] {hint}: waiting up to {timeout_s} s for all processes to join",
              file=sys.stderr, flush=True)
    # JAX aborts the process from C++ when not every process registers in time; a watchdog that
    # fires first turns that into one readable line and exit code 2.
    watchdog = threading.Timer(timeout_s, _not_all_joined, (hint, num_processes, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address or None,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=int(timeout_s) + 30,
                                   heartbeat_timeout_seconds=int(heartbeat_s))
    except (ValueError, TypeError, RuntimeError) as e:  # missing / inconsistent values
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedInitError(
            f"--distributed={mode}: {hint}: {first}; outside SLURM/Cloud TPU pass "
            "--coordinator_address, --num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES, JAX_PROCESS_ID), the same address and count to every process")
    finally:
        watchdog.cancel()
    return True


def _not_all_joined(hint: str, num_processes: int | None, timeout_s: float) -> None:
    n = num_processes if num_processes is not None else "all"
    print(f"error: {hint}: not all {n} processes joined within {timeout_s:g} s; check that every "
          "process was started (launch/ starts one per host), each with its own --process_id and "
          "the same --num_processes and --coordinator_address, and that they can reach process "
          "0's host (or raise --distributed_timeout)", file=sys.stderr, flush=True)
    os._exit(2)  # pipeline.EXIT_USER_ERROR; the main thread is blocked inside JAX's C++ client


def warm_cpu_collectives() -> None:
    """Open the gloo communicators of a multi-process CPU run while all processes are in step.

    Gloo gives a communicator 30 s to form the first time a device set runs a collective; later
    collectives wait as long as needed. Without this, a process that compiles the first train
    step more than 30 s after another (a persistent-cache hit on one host and a miss on the
    other, or a busy machine) kills the run with 'Gloo context initialization failed'. A
    reduction over all devices plus a process barrier right after ``initialize`` opens them.
    """
    if jax.process_count() == 1 or jax.devices()[0].platform != "cpu":
        return
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.asarray(jax.devices()), ("all",))
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("all")), np.ones(jax.local_device_count(), np.int32),
        (jax.device_count(),))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(ones)
    assert int(total) == jax.device_count()
    multihost_utils.sync_global_devices("fluxflow_jax: collectives ready")


def main(argv) -> int:
    """Validate, print the plan or train; the exit code says how the run ended (see --help)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax/XLA INFO lines drown the progress bar
        logging.set_verbosity(logging.WARNING)
    if FLAGS.workdir and not FLAGS.validate:  # from here on a signal saves instead of killing
        with controls_lib.StopControls(Path(FLAGS.workdir)) as controls:
            return _main(controls)
    return _main(None)


def _main(controls: controls_lib.StopControls | None) -> int:
    try:
        maybe_initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                     FLAGS.num_processes, FLAGS.process_id,
                                     FLAGS.distributed_timeout, FLAGS.distributed_heartbeat)
    except DistributedInitError as e:
        print(f"error: {e}", file=sys.stderr)
        return pipeline.EXIT_USER_ERROR
    logging.info("CPU host runtime: %s", xla.configure_cpu_host())
    warm_cpu_collectives()
    xla.enable_compilation_cache(FLAGS.compilation_cache)
    config = FLAGS.config
    if config is None:
        raise app.UsageError("--config is required (e.g. --config=configs/demo.py)")
    errors = stages.validate_config(config)
    if FLAGS.workdir and not errors:
        errors = stages.resume_errors(config, Path(FLAGS.workdir))
    if errors:
        print(stages.ConfigError(errors), file=sys.stderr)
        return pipeline.EXIT_USER_ERROR
    if FLAGS.validate:
        print(stages.describe_plan(config))
        print("config OK")
        return pipeline.EXIT_OK
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required to train")
    try:
        pstate = pipeline.run(config, FLAGS.workdir, controls)
    except USER_ERRORS as e:
        if FLAGS.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return pipeline.EXIT_USER_ERROR
    code = pipeline.exit_code(pstate)
    if code == pipeline.EXIT_DIVERGED:
        print(f"error: {pstate['last_stop'].get('reason')}", file=sys.stderr)
    return code


def _flag_error(e: Exception) -> str:
    """ml_collections' override errors as one line: "--config.x: no such key (did you mean y?)"."""
    msg = " ".join(str(e).replace("\\n", " ").strip("'\"").split())
    return msg.replace("\\'", "'")


def run() -> None:
    """Console-script entry. Exit codes: 0 finished, 2 user error (config, data, files: one line
    naming the key or file; --verbose for the traceback), 3 diverged (the last good checkpoint
    is kept), 75 interrupted by a signal or W/.stop (run the same command to resume)."""
    started = []

    def entry(argv):
        started.append(True)
        sys.exit(main(argv))

    try:
        app.run(entry)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if started or "--verbose" in sys.argv:  # raised by the run, not by the flags: internal
            raise
        print(f"error: bad command-line override: {_flag_error(e)}", file=sys.stderr)
        sys.exit(pipeline.EXIT_USER_ERROR)


if __name__ == "__main__":
    run()
