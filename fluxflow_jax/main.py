"""Entry point: ``python -m fluxflow_jax.main --config=configs/phase1.py[:arg] --workdir=runs/x``.

``--config.a.b=value`` overrides any config key (the config is locked: a misspelt key fails).
``--validate`` prints the stage plan and exits. ``--distributed=auto|on|off`` calls
``jax.distributed.initialize()`` before anything touches a device (TPU pods, multi-node GPU).
Stop controls while running: ``touch W/.pause`` (pause until removed), ``W/.checkpoint``
(save now + samples), ``W/.stop`` (save and exit); SIGTERM/SIGINT save and exit too.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

# Importing the package touches no device, so jax.distributed can still be initialised first.
from fluxflow_jax import checkpoint, data, interop, pipeline, stages, weights
from fluxflow_jax import controls as controls_lib

# What a user can fix: reported in one line (exit 2); anything else is an internal error and keeps
# its traceback. --verbose shows tracebacks for these too.
USER_ERRORS = (stages.ConfigError, weights.WeightsError, interop.InteropError,
               checkpoint.CheckpointMismatchError, checkpoint.CheckpointError, data.DataError,
               FileNotFoundError, NotADirectoryError, PermissionError)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, exports, metrics, samples).")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "Call jax.distributed.initialize(): 'auto' does it when a multi-process "
                  "environment is detected (TPU pod, SLURM, a coordinator address).")
flags.DEFINE_bool("validate", False, "Print the stage plan and exit without training.")
flags.DEFINE_bool("verbose", False, "Show tracebacks for user errors too (config, data, files).")
flags.DEFINE_string("compilation_cache",
                    os.environ.get("FLUXFLOW_JAX_CACHE", "~/.cache/fluxflow_jax/xla"),
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


def maybe_initialize_distributed(mode: str) -> bool:
    """Initialise multi-host JAX first thing (before any device use). Returns whether it did."""
    if mode == "on" or (mode == "auto" and _multiprocess_env()):
        jax.distributed.initialize()
        return True
    return False


def enable_compilation_cache(path: str) -> None:
    """Persist compiled executables across processes (same HLO -> same executable, so resumed
    runs stay bit-identical; a preempted job restarts in seconds instead of recompiling)."""
    if not path or path.lower() == "none":
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    maybe_initialize_distributed(FLAGS.distributed)
    enable_compilation_cache(FLAGS.compilation_cache)
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
