"""The product: ``python -m fluxflow_jax.main`` end to end on the demo config at test size.

Runs real subprocesses (as a user would), so signals and restarts are real. One uninterrupted
run is shared by several checks; further runs are killed (SIGKILL / SIGTERM) and restarted.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from run_utils import compile_cache, load_config, xla_flags
from safetensors.numpy import load_file
from tensorboardX.proto import event_pb2

from fluxflow_jax import interop
from fluxflow_jax import workdir as workdir_lib

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/phase1.py", "configs/phase2.py", "configs/pipeline.py", "configs/demo.py",
           "experiments/shapes_t2i/config.py"]  # the last two train on embedded data
DEMO = "configs/demo.py:test"
pytestmark = pytest.mark.xdist_group("pipeline")
# One compilation cache for this module's runs: the first run compiles, the restarts reuse it
# (the same executables, so the bit-identical comparisons also hold across the cache).
CACHE = compile_cache()


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    env["FLUXFLOW_JAX_CACHE"] = CACHE
    env["XLA_FLAGS"] = xla_flags()  # one device, the suite's flags
    return env


def _main_cmd(workdir, *extra, config=DEMO):
    return [sys.executable, "-m", "fluxflow_jax.main", f"--config={config}",
            f"--workdir={workdir}", *extra]


def _tb_image_steps(tb_dir):
    """{tag: [step, ...]} of the image summaries in tensorboardX event files (TFRecord framing)."""
    out = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            for v in event.summary.value:
                if v.HasField("image"):
                    out.setdefault(v.tag, []).append(event.step)
    return out


def _run(workdir, *extra, config=DEMO, timeout=900):
    p = subprocess.run(_main_cmd(workdir, *extra, config=config), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    return p


def _start(workdir, *extra, log=None, config=DEMO):
    return subprocess.Popen(_main_cmd(workdir, *extra, config=config), cwd=ROOT, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=600, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ckpt_steps(workdir, stage):
    d = Path(workdir) / "checkpoints" / stage
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def _export_arrays(workdir):
    out = {}
    for stage_dir in sorted((Path(workdir) / "export").iterdir()):
        for f in sorted(stage_dir.glob("*.safetensors")):
            for k, v in load_file(str(f)).items():
                out[f"{stage_dir.name}/{f.name}/{k}"] = v
    return out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("demo_full")
    p = _run(wd)
    assert p.returncode == 0, f"demo run failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    (wd / "demo_stdout.txt").write_text(p.stdout)
    return wd


@pytest.mark.parametrize("config", CONFIGS + [c + ":runlocal" for c in CONFIGS])
def test_every_shipped_config_is_valid_and_has_a_plan(config):
    from fluxflow_jax import stages
    c = load_config(config)
    assert stages.validate_config(c, check_paths=False) == []
    # away from its data, only the data paths are reported (each naming its key)
    errs = stages.validate_config(c)
    assert all(e.startswith("datasets.") and e.endswith("does not exist") for e in errs), errs
    embedded = "demo" in config or "shapes_t2i" in config
    assert bool(errs) == (not config.endswith(":runlocal") and not embedded)
    plan = stages.describe_plan(c)
    for name in c.stage_order:
        assert name in plan
    assert "optimizer" in plan and "dataset:" in plan and "per device" in plan


def test_validate_flag_prints_the_plan_and_trains_nothing(tmp_path):
    from fluxflow_jax import data
    d = data.write_shapes_folder(tmp_path / "data", 4, img_size=16)
    p = subprocess.run([sys.executable, "-m", "fluxflow_jax.main", "--config=configs/pipeline.py",
                        f"--config.datasets.main.image_folder={d['image_folder']}",
                        f"--config.datasets.main.captions_file={d['captions_file']}",
                        "--validate", f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "PIPELINE PLAN" in p.stdout and "config OK" in p.stdout
    assert "Stage 3/3: flow_training" in p.stdout
    assert not (tmp_path / "w").exists()


def test_bad_config_reports_every_error_with_its_key():
    from fluxflow_jax import stages
    c = load_config()
    c.stages.vae_warmup.train = ("vea",)
    c.stages.vae_gan.optimizers.vae.lr = -1.0
    c.stages.flow.dataset = "nope"
    c.model.activation = "tanhh"
    c.stages.flow.loss.objective = "ddim"
    c.compile_ahead = -2
    with pytest.raises(stages.ConfigError) as e:
        stages.check_config(c)
    msg = str(e.value)
    for key in ("stages.vae_warmup.train", "stages.vae_gan.optimizers.vae", "stages.flow.dataset",
                "model.activation", "stages.flow.loss.objective", "compile_ahead: -2"):
        assert key in msg, f"{key} missing from:\n{msg}"
    assert len(e.value.errors) >= 6


def test_misspelt_override_fails_loudly(tmp_path):
    p = _run(tmp_path / "w", "--config.stages.vae_warmup.stpes=3", "--validate")
    assert p.returncode == 2
    assert "stpes" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_demo_leaves_every_artifact(demo_run):
    wd = demo_run
    ps = json.loads((wd / "pipeline_state.json").read_text())
    assert ps["finished"] == ["vae_warmup", "vae_gan", "flow"]
    # After compiling, each step kind names the library its CPU convolutions run in (xla.jit
    # picks YNNPACK for the demo's small convolutions).
    out = (wd / "demo_stdout.txt").read_text()
    assert re.search(r"\[vae_gan\] compiled disc\+vae in [0-9.]+ s \(CPU convolutions: "
                     r"disc YNNPACK, vae YNNPACK\)", out), out[-3000:]
    for stage in ps["finished"]:
        assert _ckpt_steps(wd, stage), f"no checkpoint for {stage}"
        lines = [json.loads(l) for l in (wd / "graph" / f"training_metrics_{stage}.jsonl")
                 .read_text().splitlines()]
        assert lines and {"timestamp", "session_id", "epoch", "batch", "global_step",
                          "metrics"} <= set(lines[0])
        assert (wd / "graph" / f"{stage}_training_losses.png").exists()
        assert (wd / "stages" / stage / "params.safetensors").exists()
    assert (wd / "export" / "vae_gan" / "D_img.safetensors").exists()
    flow_export = wd / "export" / "flow"
    for f in ("flxflow_final.safetensors", "text_encoder.safetensors"):
        assert (flow_export / f).exists()
    keys = load_file(str(flow_export / "flxflow_final.safetensors")).keys()
    assert any(k.startswith("diffuser.flow_processor.") for k in keys)
    assert any(k.endswith("rotary_pe.inv_freq") for k in keys)
    samples = sorted(p.name for p in (wd / "samples").glob("*.png"))
    assert any("recon" in s for s in samples) and any("_gen_" in s for s in samples)
    assert any((wd / "tb").rglob("events.out.tfevents*"))
    # the sample grids are in TensorBoard too, at the steps the PNGs were written
    images = _tb_image_steps(wd / "tb" / "flow")
    gen_steps = sorted(int(s.rsplit("step", 1)[1][:6]) for s in samples if s.startswith("flow_gen"))
    offset = workdir_lib.global_step_offset(wd, ["vae_warmup", "vae_gan", "flow"], "flow")
    assert images.get("samples/gen") == [offset + s for s in gen_steps], (images, gen_steps)
    # held-out evaluation during training lands in the JSONL beside its baselines
    evals = {}
    for stage in ps["finished"]:
        for line in (wd / "graph" / f"training_metrics_{stage}.jsonl").read_text().splitlines():
            evals.update({k: v for k, v in json.loads(line)["metrics"].items()
                          if k.startswith("eval/")})
    assert {"eval/psnr", "eval/ssim", "eval/psnr_mean_image", "eval/psnr_background",
            "eval/color_score", "eval/relation_score"} <= set(evals), sorted(evals)
    assert 0.0 <= evals["eval/color_score"] <= 1.0 and evals["eval/psnr"] > 0
    # global_step continues across stages
    last_vae = json.loads((wd / "graph/training_metrics_vae_warmup.jsonl").read_text()
                          .splitlines()[-1])["global_step"]
    first_gan = json.loads((wd / "graph/training_metrics_vae_gan.jsonl").read_text()
                           .splitlines()[0])["global_step"]
    assert first_gan > last_vae


def test_stage_export_loads_back_to_identical_params(demo_run):
    wd = demo_run
    ours = interop.load_flax_params(wd / "stages" / "flow" / "params.safetensors")
    back = interop.load_reference(wd / "export" / "flow")
    for name in ("compressor", "expander", "flow", "text_encoder"):
        a = interop.common._flat(ours[name][0]["params"])
        b = interop.common._flat(back[name][0]["params"])
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=f"{name}{k}")


def test_finished_stages_are_not_rerun(demo_run):
    before = (demo_run / "pipeline_state.json").read_text()
    p = _run(demo_run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("already finished") == 3
    assert json.loads(before)["finished"] == json.loads(
        (demo_run / "pipeline_state.json").read_text())["finished"]


def test_sigkill_mid_stage_then_resume_is_bit_identical(demo_run, tmp_path):
    wd = tmp_path / "killed"
    with open(tmp_path / "log1.txt", "w") as log:
        proc = _start(wd, log=log)
        _wait_for(lambda: 5 in _ckpt_steps(wd, "vae_gan"), proc, what="a vae_gan checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    ps = json.loads((wd / "pipeline_state.json").read_text())
    assert "vae_gan" not in ps["finished"]
    p = _run(wd)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from step" in p.stdout
    a, b = _export_arrays(demo_run), _export_arrays(wd)
    assert a.keys() == b.keys()
    diff = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:5]}"
    # ... and byte for byte (metadata included), param files and exports alike
    files = sorted(p.relative_to(demo_run) for p in demo_run.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(wd) for p in wd.rglob("*.safetensors"))
    differ = [str(f) for f in files if (demo_run / f).read_bytes() != (wd / f).read_bytes()]
    assert not differ, f"files differ in bytes: {differ}"
    # every step is logged once although steps after the last checkpoint ran twice
    for stage in ("vae_warmup", "vae_gan", "flow"):
        steps = [json.loads(line)["global_step"] for line in
                 (wd / "graph" / f"training_metrics_{stage}.jsonl").read_text().splitlines()]
        assert len(steps) == len(set(steps)) and steps == sorted(steps), (stage, steps)


def test_sigterm_saves_a_checkpoint_at_that_step(tmp_path):
    wd = tmp_path / "term"
    with open(tmp_path / "log.txt", "w") as log:
        # A long first stage, so the signal lands mid-stage however warm the compile cache is.
        proc = _start(wd, "--config.checkpoint.interval_steps=1000",
                      "--config.stages.vae_warmup.steps=100000", log=log)
        metrics = wd / "graph" / "training_metrics_vae_warmup.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc,
                  what="two logged lines")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    assert rc == 75, (tmp_path / "log.txt").read_text()[-3000:]  # interrupted: rerun to resume
    assert "saved a checkpoint at step" in (tmp_path / "log.txt").read_text()
    steps = _ckpt_steps(wd, "vae_warmup")
    assert steps, "SIGTERM left no checkpoint"
    ps = json.loads((wd / "pipeline_state.json").read_text())
    assert ps["last_stop"]["interrupted"] and ps["last_stop"]["step"] == steps[-1]
    assert "vae_warmup" not in ps["finished"]


def test_loss_threshold_stop_ends_stage_early(tmp_path):
    wd = tmp_path / "stop"
    p = _run(wd, "--config.stages.vae_warmup.stop_threshold=1e9",
             "--config.stages.vae_warmup.stop_window=2",
             "--config.stage_order=('vae_warmup',)")
    assert p.returncode == 0, p.stderr[-4000:]
    ps = json.loads((wd / "pipeline_state.json").read_text())
    res = ps["results"]["vae_warmup"]
    assert res["stopped_early"] and "vae_loss" in res["stopped_early"]
    assert res["step"] < res["total_steps"]
