"""The Bezier-vs-ReLU experiment script end to end at its tiny size (issue 13), so it cannot rot:
two variants (Bezier and the parameter-matched ReLU), one seed, a few steps, through its main().
The compilation cache is a fresh folder: the step-memory measurement reuses the training run's
compiled step from it, as in a real run, and nothing is written to the user's cache."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

EXP = Path(__file__).resolve().parents[1] / "experiments" / "bezier_vs_relu"
# One xdist worker for the module: the experiment fixture (~80 s) is module-scoped, and tests on
# two workers each ran it once.
pytestmark = pytest.mark.xdist_group("bezier_vs_relu")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    sys.path.insert(0, str(EXP))
    try:
        run = importlib.import_module("run")
        out = tmp_path_factory.mktemp("bvr")
        rc = run.main(["--size", "tiny", "--seeds", "0", "--steps", "6",
                       "--variants", "bezier,relu_params", "--out", str(out),
                       "--compilation_cache", str(out / "xla")])
        variants = importlib.import_module("variants")
        yield rc, out, json.loads((out / "results.json").read_text()), variants
    finally:
        sys.path.remove(str(EXP))


def test_bezier_vs_relu_writes_results_and_plots(experiment):
    rc, out, res, _ = experiment
    assert rc == 0
    assert set(res["variants"]) == {"bezier", "relu_params"}
    assert res["setup"]["steps"] == 6 and res["setup"]["seeds"] == [0]
    for name in ("psnr", "ssim", "loss", "final_psnr", "step_time", "step_time_bench", "memory",
                 "params"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for v, s in res["variants"].items():
        assert {"curves", "final", "steps_to_threshold", "step_time_s", "memory", "stability",
                "params", "vae_dim", "baselines_db"} <= set(s), v
        assert s["eval_steps"] == [3, 6]  # the tiny size evaluates every 3 steps
        assert len(s["curves"]["psnr"]["per_seed"]["0"]) == 2
        assert s["loss_steps"] == list(range(1, 7))  # one row per step
        psnr = s["final"]["psnr"]
        assert psnr["n"] == 1 and math.isfinite(psnr["mean"]) and 5.0 < psnr["mean"] < 60.0
        assert 0.0 < s["final"]["ssim"]["mean"] <= 1.0
        assert s["step_time_s"]["mean"] > 0.0
        assert s["memory"]["peak_bytes"] > 0 and s["memory"]["bench_step_s"] > 0
        assert s["stability"]["0"]["diverged"] is False
        assert math.isfinite(s["baselines_db"]["psnr_background"])


def test_bezier_vs_relu_matchings_differ_as_expected(experiment):
    """Equal width: the ablation has fewer parameters (its feeding layers are 1x, not 5x). Equal
    parameters: the widened ablation is within 10% of Bezier's count - and wider."""
    _, _, res, variants = experiment
    v = res["variants"]
    b, rp = v["bezier"], v["relu_params"]
    r = variants.plan("tiny", ["relu"])["relu"]  # equal width: counted, not trained here
    assert r["vae_dim"] == b["vae_dim"] and r["params"] < 0.7 * b["params"]
    assert r["bezier_params"] == b["params"]
    assert rp["vae_dim"] > b["vae_dim"]
    assert abs(rp["params"] - b["params"]) / b["params"] < 0.10
    # the counts in the results are the counts of the models that were trained
    assert rp["params"] == variants.vae_param_count("tiny", "relu", rp["vae_dim"])
    assert b["matching"] == "reference" and r["matching"] == "equal width"
    assert rp["params"] != b["params"]  # the report gives both counts, not the target
    assert rp["matching"] == "equal parameters"


def test_bezier_vs_relu_summary_functions():
    """Threshold crossing, spread and spike detection on hand-made rows."""
    sys.path.insert(0, str(EXP))
    try:
        analysis = importlib.import_module("analysis")
    finally:
        sys.path.remove(str(EXP))
    assert analysis.steps_to_threshold([50, 100, 150], [20.0, 22.5, 21.0], 22.0) == 100
    assert analysis.steps_to_threshold([50], [None], 22.0) is None
    s = analysis.spread([1.0, 3.0, float("nan")])
    assert s["mean"] == 2.0 and s["n"] == 2 and s["n_nonfinite"] == 1
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    rows = [{"global_step": i, "extras": {"stage_step": i, "batch_time": 0.1},
             "metrics": {"vae_loss": 10.0 if i == 30 else 1.0}} for i in range(1, 41)]
    stab = analysis.stability(rows, {"results": {"vae": {"nonfinite": 0}}})
    assert stab["loss_spikes"] == 1 and stab["spike_steps"] == [30]
    assert stab["max_loss_ratio"] == pytest.approx(10.0)
    assert analysis.median_step_time(rows) == pytest.approx(0.1)
    assert stab["dead_from_step"] is None  # no gradient norms logged: nothing to call dead
    grads = [0.5] * 9 + [1e-7] * 31  # the equal-width ReLU's pattern: gradient gone by step 10
    dead = [{**r, "metrics": {**r["metrics"], "grad_norm_vae": g}} for r, g in zip(rows, grads)]
    assert analysis.dead_from_step(dead) == 10
    dead[-1]["metrics"]["grad_norm_vae"] = 0.3  # learning again at the end: not dead
    assert analysis.dead_from_step(dead) is None


def test_vae_head_activation_reaches_the_models_and_is_validated():
    """model.vae_head_activation='identity' lets a ReLU VAE output negative pixels (its RGB site
    is linear); the default '' keeps the ReLU there (outputs >= 0); a bad value is refused."""
    import jax
    import jax.numpy as jnp

    from fluxflow_jax import stages
    from fluxflow_jax.models import registry

    sys.path.insert(0, str(EXP))
    try:
        variants = importlib.import_module("variants")
    finally:
        sys.path.remove(str(EXP))
    outs = {}
    for head in ("", "identity"):
        cfg = variants.make_config("tiny", "relu", 8, 0, steps=1, head=head)
        ms = registry.build_models(cfg.model, {"compressor", "expander"})
        assert ms.compressor.head_activation == ms.expander.head_activation == head
        params, _ = registry.init_params(ms, jax.random.key(1), image_hw=(16, 16))
        assert "rgb_activation" not in params["expander"]  # neither ReLU nor identity has params
        packed = jax.random.normal(jax.random.key(2), (2, 4 * 4 + 1, 8))
        packed = packed.at[:, -1].set(0.0)
        outs[head] = ms.expander.apply({"params": params["expander"]}, packed, hw=(4, 4))
    assert float(jnp.min(outs[""])) >= 0.0
    assert float(jnp.min(outs["identity"])) < 0.0
    bad = variants.make_config("tiny", "relu", 8, 0, steps=1, head="linear")
    assert any("model.vae_head_activation" in e for e in stages.validate_config(bad))
