"""A flow stage trained from cached latents (``latent_cache=True``) equals the same stage trained
from images with a deterministic encoder, step for step, on square and non-square images."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import ROOT, _run  # noqa: E402

pytestmark = pytest.mark.xdist_group("cached")


def _config(tmp_path: Path, img_size) -> Path:
    p = tmp_path / "cfg.py"
    p.write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("demo", {str(ROOT / 'configs/demo.py')!r})
        demo = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(demo)

        def get_config(arg=""):
            c = demo.get_config("test")
            from fluxflow_jax import config_defaults as cd
            c.datasets.shapes = cd.dataset_config("shapes", img_size={img_size!r},
                                                  resize_mode="fixed", num_samples=8)
            c.stage_order = ("flow",)
            c.stages.flow.steps = 3
            c.stages.flow.schedulers.flow.warmup_steps = 1
            c.stages.flow.loss.sample_posterior = False
            c.log_interval = 1
            c.samples.enabled = False
            return c
        """))
    return p


def _losses(wd: Path) -> list[float]:
    lines = (wd / "graph" / "training_metrics_flow.jsonl").read_text().splitlines()
    return [json.loads(line)["metrics"]["flow_loss"] for line in lines]


@pytest.mark.parametrize("img_size", [16, [16, 32]], ids=["square", "non_square"])
def test_flow_from_cached_latents_matches_flow_from_images(tmp_path, img_size):
    cfg = str(_config(tmp_path, img_size))
    a = _run(tmp_path / "images", config=cfg)
    assert a.returncode == 0, a.stderr[-3000:]
    b = _run(tmp_path / "cached", "--config.stages.flow.latent_cache=True",
             "--config.samples.enabled=True", config=cfg)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "[cache] encoding datasets.shapes" in b.stdout
    # a cached stage still draws its prompts' sample grid (it used to skip samples silently)
    assert (tmp_path / "cached" / "samples" / "flow_gen_step000003.png").is_file()
    caches = list((tmp_path / "cached" / "cache").glob("shapes-*/manifest.json"))
    assert len(caches) == 1
    la, lb = _losses(tmp_path / "images"), _losses(tmp_path / "cached")
    assert len(la) == len(lb) == 3
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)
