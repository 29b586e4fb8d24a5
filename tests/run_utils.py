"""Workdir helpers shared by the end-to-end tests."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# LLVM at -O0 for every program the tests compile: in the pytest processes (conftest.py puts it
# in XLA_FLAGS before JAX starts its backend) and in every command they start. Compiling is most
# of the suite's time on 2 cores, and -O0 roughly halves it: the test-size demo (three stages)
# took 166.5 s wall / 233.7 s CPU at the default level and 104.7 / 129.2 s at -O0 on a 2-core AMD
# EPYC VM. The flag changes how XLA's element-wise loops are optimised, not what the programs
# compute (convolutions and matmuls run in the same library kernels), and every run a test
# compares with another - a restart, another topology, the cached stage - compiles alike.
#
# And XLA:CPU's older loop emitters for element-wise fusions instead of its MLIR fusion emitters
# (jaxlib 0.10): the same kind of change, cheaper to compile. The tests' disc, VAE (GAN) and flow
# steps (tests/test_steps_multidevice.py's single-device models) took 41.5 s to compile at -O0
# and 31.4 s with the old emitters (means of 3 interleaved runs, 2-core AMD EPYC VM); their
# step times did not change.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
# ... except where a test checks rounding itself: at -O0 LLVM forms no fused multiply-adds, so
# exp and friends round a little differently, and two programs that agree to the bit at the
# default level (3, what a user's runs compile at) may not. Such a test jits with these options.
USER_LEVEL = {"xla_backend_optimization_level": 3}


def xla_flags(devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a command a test starts: the suite's flags, plus ``devices`` CPU devices
    when given (the pytest process has one)."""
    return TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}"
                             if devices else "")


def compile_cache() -> str:
    """The session's persistent compilation cache (conftest.py makes it, shares it with xdist's
    workers and removes it at the end), for the commands the tests start (``FLUXFLOW_JAX_CACHE``):
    a restart reuses its first run's executables, so bit-identical comparisons hold across it."""
    return os.environ["FLUXFLOW_JAX_TEST_CACHE"]


def rewound_copy(src: Path, dst: Path, stage: str, step: int) -> Path:
    """A copy of a finished workdir as a preemption right after ``stage``'s checkpoint ``step``
    leaves it: later checkpoints, the stage's param file and exports gone, the stage unfinished
    (its JSONL keeps later rows; the resumed run drops and rewrites them)."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints" / stage).iterdir():
        if int(p.name) > step:
            shutil.rmtree(p)
    assert (dst / "checkpoints" / stage / str(step)).is_dir(), "no checkpoint at that step"
    shutil.rmtree(dst / "stages" / stage)
    shutil.rmtree(dst / "export" / stage)
    ps = json.loads((dst / "pipeline_state.json").read_text())
    ps["finished"] = [s for s in ps["finished"] if s != stage]
    ps["current"] = stage
    ps.get("results", {}).pop(stage, None)
    (dst / "pipeline_state.json").write_text(json.dumps(ps))
    return dst


def load_config(spec: str = "configs/demo.py:test"):
    """A shipped config as ``--config=path[:arg]`` reads it: ``get_config(arg)`` of the file
    ``path`` under the repository root (default: the demo at test size)."""
    from fluxflow_jax.config_defaults import load_config_file
    return load_config_file(spec, ROOT)
