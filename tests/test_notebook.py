"""launch/colab.ipynb executed top to bottom as a user would (nbclient, a real kernel), on the
CPU at the demo's test size, offline: the install cell is skipped (the package is installed), the
training cell runs the real command, the plot cell displays images, the generate cell either
generates or says why it skipped."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from run_utils import xla_flags

ROOT = Path(__file__).resolve().parents[1]
# Two short stages (VAE warm-up, then flow on it): every kind of plot and sample grid, cheaply.
OVERRIDES = ("--config.stage_order=('vae_warmup','flow') --config.stages.vae_warmup.steps=4 "
             "--config.stages.flow.steps=11")


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.get("output_type") == kind]


def _text(cell):
    return "".join(o.get("text", "") for o in _outputs(cell, "stream"))


def test_colab_notebook_trains_shows_plots_and_generates(tmp_path, monkeypatch):
    wd = tmp_path / "run"
    env = {"FLUXFLOW_SKIP_INSTALL": "1", "FLUXFLOW_CONFIG": "configs/demo.py:test",
           "FLUXFLOW_OVERRIDES": OVERRIDES, "FLUXFLOW_WORKDIR": str(wd),
           "FLUXFLOW_REPO_DIR": str(ROOT), "FLUXFLOW_USE_DRIVE": "0", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the kernel and the training subprocess inherit these
    monkeypatch.setenv("XLA_FLAGS", xla_flags())  # one device, the suite's flags
    if os.environ.get("FLUXFLOW_JAX_TEST_CACHE"):
        monkeypatch.setenv("FLUXFLOW_JAX_CACHE", os.environ["FLUXFLOW_JAX_TEST_CACHE"])
    nb = nbformat.read(ROOT / "launch" / "colab.ipynb", as_version=4)
    NotebookClient(nb, timeout=1500, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]  # execute() raised if any cell failed

    install = next(c for c in code if "def accelerator()" in c.source)
    assert "install skipped (fluxflow_jax already installed)" in _text(install)
    assert "runtime: cpu" in _text(install)
    devices = next(c for c in code if c.source.startswith("import jax"))
    assert _text(devices).startswith("1 x cpu:")

    train = next(c for c in code if "fluxflow_jax.main" in c.source)
    out = _text(train)
    assert "[vae_warmup] finished at step 4" in out and "[flow] finished at step 11" in out
    for stage in ("vae_warmup", "flow"):
        assert (wd / "export" / stage / "flxflow_final.safetensors").stat().st_size > 0
        assert f"export/{stage}/flxflow_final.safetensors" in out
    assert not (wd / "export" / "vae_gan").exists()  # the overrides reached the run

    plots = next(c for c in code if "_training_overview.png" in c.source)
    images = [o for o in _outputs(plots, "display_data") if "image/png" in o["data"]]
    names = {p.name.rsplit("_step", 1)[0] for p in wd.glob("samples/*_step*.png")}
    assert {"vae_warmup_recon", "flow_gen"} <= names
    n_overview = len(list(wd.glob("graph/*_training_overview.png")))
    assert n_overview == 2 and len(images) == n_overview + len(names)
    assert f"{len(images)} images shown" in _text(plots)

    gen = code[-1]
    assert "fluxflow_jax.generate" in gen.source
    import importlib.util
    if importlib.util.find_spec("fluxflow_jax.generate") is None:
        assert "skipping generation: this fluxflow_jax has no fluxflow_jax.generate" in _text(gen)
    else:
        assert (wd / "generated" / "grid.png").exists()
        assert len(list((wd / "generated").glob("*.png"))) >= 5  # 4 images + grid
        assert any("image/png" in o["data"] for o in _outputs(gen, "display_data"))
