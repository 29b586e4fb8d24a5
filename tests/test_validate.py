"""``--validate`` on broken configs: every mistake found before training, one line each, naming
its key and the fix; and a dataset re-pointed from the command line validates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("validate")

# (case, python lines that break configs/demo.py:test, expected line in the output)
CASES = [
    ("top_level_typo", "c.log_intervall = 5",
     "log_intervall: unknown key (did you mean 'log_interval'?)"),
    ("checkpoint_typo", "c.checkpoint.interval_step = 5",
     "checkpoint.interval_step: unknown key (did you mean 'interval_steps'?)"),
    ("samples_typo", "c.samples.num_image = 2", "samples.num_image: unknown key"),
    ("missing_data", "c.datasets.shapes.type = 'folder'\n"
                     "c.datasets.shapes.image_folder = '/nonexistent/img'\n"
                     "c.datasets.shapes.captions_file = '/nonexistent/captions.txt'",
     "datasets.shapes.image_folder: '/nonexistent/img' does not exist"),
    ("scheduler_type", "c.stages.flow.schedulers.flow.type = 'Cosine'",
     "stages.flow.schedulers.flow.type: unsupported scheduler 'Cosine'"),
    ("stop_metric", "c.stages.vae_warmup.stop_metric = 'vae_los'",
     "stages.vae_warmup.stop_metric: 'vae_los' is not logged by this stage"),
    ("plateau_metric", "c.stages.flow.schedulers.flow = dict(type='ReduceLROnPlateau', "
                       "metric='flow_los')",
     "stages.flow.schedulers.flow.metric: 'flow_los' is not logged by this stage"),
    ("loss_key", "c.stages.vae_warmup.loss.kl_bta = 1.0",
     "stages.vae_warmup.loss.kl_bta: unknown key"),
    ("loss_value", "c.stages.flow.loss.cfg_dropout_prob = 1.5",
     "stages.flow.loss.cfg_dropout_prob: must be in [0, 1), got 1.5"),
    ("activation", "c.model.activation = 'tanh'", "model.activation: 'tanh' not in"),
    ("train_flag", "c.stages.flow.train = ('flw',)", "stages.flow.train: unknown entry 'flw'"),
    ("freeze_trained", "c.stages.vae_warmup.freeze = ('compressor',)",
     "stages.vae_warmup.freeze: 'compressor' is frozen but the stage trains it"),
]


def _config_file(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "broken.py"
    p.write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("demo", {str(ROOT / 'configs/demo.py')!r})
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)

        def get_config(arg=""):
            c = demo.get_config("test")
        """) + textwrap.indent(body, "    ") + "\n    return c\n")
    return p


def _validate(config: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    e.setdefault("XLA_FLAGS", "")
    return subprocess.run([sys.executable, "-m", "fluxflow_jax.main", f"--config={config}",
                           "--validate", *extra], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case,body,expected", CASES, ids=[c[0] for c in CASES])
def test_validate_names_the_key_in_one_line(tmp_path, case, body, expected):
    p = _validate(str(_config_file(tmp_path, body)))
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip().startswith("- ")]
    hits = [ln for ln in lines if expected in ln]
    assert hits, f"{expected!r} not in {lines}"
    assert "Traceback" not in p.stderr


def test_validate_checks_the_batch_against_the_devices(tmp_path):
    p = _validate("configs/demo.py:test", "--config.batch_size=6",
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert p.returncode == 2
    assert "batch_size: 6 is not divisible by the 4 devices" in p.stderr


def test_validate_refuses_a_model_change_under_an_existing_workdir(tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"model": {"vae_dim": 12}, "stages": {}}))
    p = _validate("configs/demo.py:test", f"--workdir={wd}")
    assert p.returncode == 2
    assert "model.vae_dim: 8 differs from 12 of the run in" in p.stderr
    assert "new --workdir" in p.stderr


def test_a_dataset_can_be_repointed_from_the_command_line(tmp_path):
    from fluxflow_jax import data
    cfg = data.write_shapes_folder(tmp_path / "imgs", 8, img_size=16)
    p = _validate("configs/demo.py:test", "--config.datasets.shapes.type=folder",
                  f"--config.datasets.shapes.image_folder={cfg['image_folder']}",
                  f"--config.datasets.shapes.captions_file={cfg['captions_file']}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "dataset: shapes (folder)" in p.stdout


def test_the_entry_point_sets_up_the_cpu_host_before_jax_starts():
    """``main`` configures the CPU runtime (``xla.configure_cpu_host``) before anything starts
    JAX's backends, where the setting can still take effect; ``evaluate`` and ``generate`` call
    it first thing too."""
    p = _validate("configs/demo.py:test", "--verbosity=0")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "CPU host runtime: on" in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("cli", ["generate", "evaluate"])
def test_sampling_entry_points_set_up_the_cpu_host_first(cli, tmp_path, monkeypatch, capsys):
    from fluxflow_jax import evaluate, generate, xla
    calls = []
    monkeypatch.setattr(xla, "configure_cpu_host", lambda: calls.append(1) or "on")
    main = {"generate": generate.main, "evaluate": evaluate.main}[cli]
    # An empty workdir: the command fails on it, after the set-up.
    assert main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o")]
                if cli == "generate" else ["--workdir", str(tmp_path)]) == 2
    assert calls == [1]
    assert "error:" in capsys.readouterr().err
