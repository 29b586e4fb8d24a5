"""ReduceLROnPlateau driven by the training loop: the rate drops when the metric the config names
stops improving, and a stopped-and-resumed run continues the same plateau bookkeeping.

The watched metric is the KL warm-up weight ``kl_beta``: it rises every step, so in 'min' mode it
never improves after the first value - a scripted metric that makes the drops deterministic."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import _run, _start, _wait_for  # noqa: E402

pytestmark = pytest.mark.xdist_group("plateau")
ARGS = ("--config.stage_order=('vae_warmup',)", "--config.stages.vae_warmup.steps=60",
        "--config.stages.vae_warmup.stop_metric=", "--config.log_interval=1",
        "--config.checkpoint.interval_steps=20", "--config.samples.enabled=False",
        "--config.eval.interval_steps=0", "--config.plots=False", "--config.tensorboard=False")
# (.stop saves a checkpoint at the step it lands on, so sparse interval checkpoints lose nothing;
# per-step checkpoints, eval and plots made this the slowest test in CI at 470 s)
# 60 steps: long enough that the stop file always lands mid-stage, however warm the cache
PLATEAU = "--config.stages.vae_warmup.schedulers.vae"


def _config_args(tmp_path: Path) -> list[str]:
    # the stage has no scheduler block in the demo: add one through a config file argument
    p = tmp_path / "cfg.py"
    root = Path(__file__).resolve().parents[1]
    p.write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('demo', {str(root / 'configs/demo.py')!r})\n"
        "demo = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(demo)\n"
        "from fluxflow_jax import config_defaults as cd\n"
        "def get_config(arg=''):\n"
        "    c = demo.get_config('test')\n"
        "    c.stages.vae_warmup.optimizers.vae.lr = 2e-3\n"
        "    c.stages.vae_warmup.schedulers.vae = cd.scheduler('ReduceLROnPlateau', factor=0.5,\n"
        "        patience=2, metric='kl_beta', step_every=1)\n"
        "    return c\n")
    return [str(p)]


def _lrs(wd: Path) -> list[float]:
    lines = (wd / "graph" / "training_metrics_vae_warmup.jsonl").read_text().splitlines()
    return [json.loads(x)["learning_rates"]["lr_vae"] for x in lines]


def test_plateau_drops_the_rate_and_survives_a_resume(tmp_path):
    (cfg,) = _config_args(tmp_path)
    full = tmp_path / "full"
    p = _run(full, *ARGS, config=cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = _lrs(full)
    assert len(lrs) == 60
    base = lrs[0]
    assert base == pytest.approx(2e-3)
    # drops by exactly the factor, more than once, never rises
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert all(r == pytest.approx(1.0) or r == pytest.approx(0.5) for r in ratios), ratios
    assert sum(r == pytest.approx(0.5) for r in ratios) >= 2
    assert "plateau - lr scale now vae x0.5" in p.stdout + p.stderr

    part = tmp_path / "part"
    with open(tmp_path / "log.txt", "w") as log:
        proc = _start(part, *ARGS, log=log, config=cfg)
        metrics = part / "graph" / "training_metrics_vae_warmup.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 5, proc,
                  what="five logged steps")
        (part / ".stop").touch()
        assert proc.wait(timeout=300) == 75
    p = _run(part, *ARGS, config=cfg)
    assert p.returncode == 0 and "resumed from step" in p.stdout, p.stderr[-3000:]
    assert _lrs(part) == lrs
