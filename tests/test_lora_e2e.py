"""LoRA through the user's commands: experiments/lora_shapes/run.py at CI size (it runs
``python -m fluxflow_jax.main --config=configs/lora.py:runlocal`` twice, DOP off and on, from the
same fresh tiny base, then measures), and ``python -m fluxflow_jax.generate --lora``."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from run_utils import compile_cache, xla_flags
from safetensors import safe_open

from fluxflow_jax import interop, lora_io

ROOT = Path(__file__).resolve().parents[1]
CACHE = compile_cache()
pytestmark = pytest.mark.xdist_group("lora_e2e")


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["FLUXFLOW_JAX_CACHE"] = CACHE  # the second run and generate reuse compiled executables
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = xla_flags()  # one device, the suite's flags
    return env


def _ok(p):
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_shapes")
    _ok(subprocess.run(
        [sys.executable, "experiments/lora_shapes/run.py", "--size", "tiny", "--base", "",
         "--out", str(out), "--steps", "4", "--num_images", "8", "--seeds", "1",
         "--sample_steps", "2", "--set=--config.checkpoint.interval_steps=2",
         "--set=--config.plots=False", "--set=--config.tensorboard=False",
         "--set=--config.stages.lora.lora.export_merged=True"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900, check=False))
    return out


def test_lora_shapes_experiment_tiny(experiment):
    res = json.loads((experiment / "results.json").read_text())
    for key in ("trigger_target_share", "trigger_target_top"):
        assert set(res[key]) == {"base", "lora", "lora_dop"}
        assert all(0.0 <= v <= 1.0 for v in res[key].values())
    for key in ("nontrigger_pixel_distance", "nontrigger_vote_distance"):
        assert set(res[key]) == {"lora", "lora_dop"}
        assert all(v >= 0.0 for v in res[key].values())
    assert res["nontrigger_pixel_distance"]["lora"] > 0  # 4 steps of AdamW moved the model
    assert (res["n_trigger_images"], res["n_plain_images"]) == (4, 24)
    assert all((experiment / f"grid_{m}.png").is_file() for m in ("base", "lora", "lora_dop"))
    caps = (experiment / "data" / "captions.txt").read_text().splitlines()
    assert len(caps) == 8 and all(c.split("\t")[1].startswith("a sks ") for c in caps)


def test_lora_run_outputs(experiment):
    w = experiment / "lora_dop"
    f = w / "export" / "lora" / "lora.safetensors"
    with safe_open(str(f), "np") as h:
        meta = json.loads(h.metadata()["fluxflow_jax.lora"])
        keys = list(h.keys())
    assert meta == {"rank": 4, "alpha": 4.0, "target_layers": "attention", "trigger": "sks",
                    "class_word": "colored"}
    assert "diffuser.flow_processor.transformer_blocks.0.self_attn.kv_proj.lora_B" in keys
    # samples before training (step 0: the base, prompts with and without the trigger) and at
    # every checkpoint
    assert sorted(p.name for p in (w / "samples").glob("*.png")) == [
        "lora_gen_step000000.png", "lora_gen_step000002.png", "lora_gen_step000004.png"]
    rows = [json.loads(x) for x in (w / "graph" / "training_metrics_lora.jsonl").read_text()
            .splitlines()]
    assert rows and all(r["metrics"]["dop_ran"] == 1.0 for r in rows)
    assert rows[-1]["metrics"]["loss_dop"] > 0 and "lr_lora" in rows[-1]["learning_rates"]
    plain = [json.loads(x) for x in (experiment / "lora" / "graph" /
                                     "training_metrics_lora.jsonl").read_text().splitlines()]
    assert "loss_dop" not in plain[-1]["metrics"]  # DOP off: no term, no metric
    # the checkpoint holds the adapters and their optimizer state, not optimizer state of the base
    md = json.loads((w / "checkpoints" / "lora" / "4" / "state" / "_METADATA").read_text())
    arrays = [k for k, v in md["tree_metadata"].items()
              if v["value_metadata"]["value_type"] == "jax.Array"]  # (masked entries are None)
    assert any(k.startswith("('params', 'flow_lora'") for k in arrays)
    opt = [k for k in arrays if k.startswith("('opt_state'") and "'mu'" in k]
    assert len(opt) == 12 and all("'flow_lora'" in k for k in opt)  # A, B of 6 attention layers


def _generate(export, out, *extra):
    return _ok(subprocess.run(
        [sys.executable, "-m", "fluxflow_jax.generate", "--export", str(export), "--prompt",
         "a sks circle", "--prompt", "a red square", "--steps", "2", "--seed", "3",
         "--out", str(out), *map(str, extra)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False))


def _pngs(folder):
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("0*.png"))}


def test_lora_generate_applies_adapter(experiment, tmp_path):
    w = experiment / "lora_dop"
    export, adapter = w / "export" / "lora", w / "export" / "lora" / "lora.safetensors"
    _generate(export, tmp_path / "base")
    _generate(export, tmp_path / "off", "--lora", adapter, "--lora_scale", "0")
    _generate(export, tmp_path / "on", "--lora", adapter, "--lora_scale", "4")
    base, off, on = (_pngs(tmp_path / d) for d in ("base", "off", "on"))
    assert len(base) == 2 and sorted(base) == sorted(off) == sorted(on)
    assert all(np.array_equal(base[k], off[k]) for k in base)  # scale 0 == the base model
    assert any(not np.array_equal(base[k], on[k]) for k in base)
    s = json.loads((tmp_path / "on" / "settings.json").read_text())
    assert s["lora"]["scale"] == 4.0 and s["lora"]["rank"] == 4
    bad = subprocess.run([sys.executable, "-m", "fluxflow_jax.generate", "--export", str(export),
                          "--prompt", "x", "--lora", str(tmp_path / "missing.safetensors"),
                          "--out", str(tmp_path / "x")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600, check=False)
    assert bad.returncode == 2 and "adapter file not found" in bad.stderr


def test_lora_merged_export_equals_base_plus_adapter(experiment):
    out = experiment / "lora_dop" / "export" / "lora"
    base = {k: v[0]["params"] for k, v in interop.load_any(out).items()}
    merged = {k: v[0]["params"] for k, v in interop.load_any(out / "merged").items()}
    want, _ = lora_io.apply_adapter(base, out / "lora.safetensors", 1.0)
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(merged["flow"]), jax.tree.leaves(want["flow"]))]
    assert max(diffs) < 1e-5
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(merged["flow"]), jax.tree.leaves(base["flow"]))]
    assert max(moved) > 1e-6  # the export really is merged, not the base again


def test_lora_resume_after_preemption_is_exact(experiment, tmp_path):
    """The DOP run, as a preemption right after its step-2 checkpoint leaves it, rerun with the
    same command: it resumes there and ends with the same adapter file, byte for byte."""
    # the experiment's own training command, under its own module name (bezier_vs_relu's test
    # imports another run.py as ``run`` into the same worker)
    spec = importlib.util.spec_from_file_location("lora_shapes_run",
                                                  ROOT / "experiments" / "lora_shapes" / "run.py")
    lora_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lora_shapes)

    from run_utils import rewound_copy
    w = rewound_copy(experiment / "lora_dop", tmp_path / "resumed", "lora", 2)
    extra = ["--config.checkpoint.interval_steps=2", "--config.plots=False",
             "--config.tensorboard=False", "--config.stages.lora.lora.export_merged=True"]
    first = w / "samples" / "lora_gen_step000000.png"
    first.unlink()  # a run that started over (instead of resuming) would draw it again
    lora_shapes.train(w, "", experiment / "data", "tiny", 4, 1.0, extra)
    assert not first.exists() and (w / "samples" / "lora_gen_step000004.png").is_file()
    name = Path("export") / "lora" / lora_io.ADAPTER_FILE
    assert (w / name).read_bytes() == (experiment / "lora_dop" / name).read_bytes()
    rows = [json.loads(x) for x in (w / "graph" / "training_metrics_lora.jsonl").read_text()
            .splitlines()]
    assert [r["global_step"] for r in rows] == sorted({r["global_step"] for r in rows})
