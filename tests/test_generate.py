"""``python -m fluxflow_jax.generate`` and ``python -m fluxflow_jax.evaluate`` as a user runs them:
subprocesses on a tiny demo run trained here, and on its reference-layout export."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from run_utils import compile_cache, xla_flags
from safetensors.numpy import save_file

from fluxflow_jax import evaluate, grids
from fluxflow_jax.data import shapes
from fluxflow_jax.lpips import init_lpips

ROOT = Path(__file__).resolve().parents[1]
CACHE = compile_cache()
pytestmark = pytest.mark.xdist_group("generate")


def _env():
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["FLUXFLOW_JAX_CACHE"] = CACHE
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = xla_flags()  # one device, the suite's flags
    return env


def _run(module, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", f"fluxflow_jax.{module}", *map(str, args)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(p):
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The demo config at test size, VAE warm-up then flow (with EMA), 3 steps each."""
    wd = tmp_path_factory.mktemp("gen_run")
    _ok(_run("main", "--config=configs/demo.py:test", f"--workdir={wd}",
             "--config.stage_order=('vae_warmup','flow')", "--config.stages.vae_warmup.steps=3",
             "--config.stages.flow.steps=3", "--config.stages.flow.schedulers.flow.warmup_steps=1",
             "--config.stages.flow.ema_decay=0.9", "--config.samples.enabled=False",
             "--config.plots=False", "--config.tensorboard=False"))
    assert (wd / "export" / "flow" / "ema" / "flxflow_final.safetensors").is_file()
    return wd


def _pngs(folder):
    return {p.name: np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(folder).glob("*.png"))
            if p.name != "grid.png"}


GEN = ["--prompt", "a red circle above a blue square", "--prompt", "a green triangle",
       "--num", "2", "--seed", "3"]


def test_generate_from_workdir(workdir, tmp_path):
    out = tmp_path / "ema"
    p = _ok(_run("generate", "--workdir", workdir, *GEN, "--out", out))
    assert "wrote 4 images" in p.stdout
    imgs = _pngs(out)
    assert sorted(imgs) == ["000_a_red_circle_above_a_blue_square.png",
                            "001_a_red_circle_above_a_blue_square.png",
                            "002_a_green_triangle.png", "003_a_green_triangle.png"]
    assert all(a.shape == (16, 16, 3) for a in imgs.values())  # the run's dataset size
    s = json.loads((out / "settings.json").read_text())
    flow_cfg = json.loads((Path(workdir) / "config.json").read_text())["stages"]["flow"]
    assert (s["stage"], s["weights"], s["sampler"], s["steps"], s["guidance"]) == (
        "flow", "ema", "euler", flow_cfg["sample_steps"], flow_cfg["guidance_scale"])
    assert (flow_cfg["sample_steps"], flow_cfg["guidance_scale"]) == (4, 4.0)  # demo.py:test
    assert s["files"] == sorted(imgs) and s["prompts"] == GEN[1:4:2]
    with Image.open(out / "grid.png") as g:
        assert g.size[0] == 2 * (128 + 2) + 2 and g.size[1] > 2 * (128 + 2)  # 2 rows + captions
    # two images of one prompt differ (their own noise); the same seed repeats exactly
    names = sorted(imgs)
    assert np.abs(imgs[names[0]].astype(int) - imgs[names[1]]).max() > 0
    _ok(_run("generate", "--workdir", workdir, *GEN, "--out", tmp_path / "again"))
    again = _pngs(tmp_path / "again")
    assert all(np.array_equal(imgs[k], again[k]) for k in imgs)
    # raw weights are not the EMA weights
    _ok(_run("generate", "--workdir", workdir, "--weights", "raw", *GEN, "--out", tmp_path / "raw"))
    raw = _pngs(tmp_path / "raw")
    assert json.loads((tmp_path / "raw" / "settings.json").read_text())["weights"] == "raw"
    assert any(not np.array_equal(imgs[k], raw[k]) for k in imgs)


def test_generate_from_reference_layout_files_equals_the_workdir(workdir, tmp_path):
    """The raw export, copied away from its workdir, is plain reference-layout files."""
    ref = tmp_path / "ref"
    ref.mkdir()
    for f in ("flxflow_final.safetensors", "text_encoder.safetensors"):
        shutil.copy(workdir / "export" / "flow" / f, ref / f)
    common = [*GEN, "--sampler", "heun", "--steps", "2", "--guidance", "3", "--size", "32x16",
              "--rng_impl", "rbg", "--negative", "a blue circle"]
    # bare reference files cannot tell whether SPADE was trained: they decode with it unless
    # told; this run never trained it (no 'spade' stage), which --workdir knows by itself
    _ok(_run("generate", "--checkpoint", ref / "flxflow_final.safetensors", "--checkpoint",
             ref / "text_encoder.safetensors", "--tokenizer", "demo", "--spade", "off", *common,
             "--out", tmp_path / "ckpt"))
    _ok(_run("generate", "--workdir", workdir, "--weights", "raw", *common,
             "--out", tmp_path / "wd"))
    a, b = _pngs(tmp_path / "ckpt"), _pngs(tmp_path / "wd")
    assert a.keys() == b.keys() and all(v.shape == (16, 32, 3) for v in a.values())
    for k in a:
        assert np.abs(a[k].astype(int) - b[k]).max() <= 1, k
    s = json.loads((tmp_path / "ckpt" / "settings.json").read_text())
    assert s["null"] == "negative prompt" and s["size"] == "32x16" and s["weights"] == "raw"
    assert s["spade_context"] is False
    assert json.loads((tmp_path / "wd" / "settings.json").read_text())["spade_context"] is False
    # the export folder inside the workdir finds the run's tokenizer and defaults itself
    _ok(_run("generate", "--export", workdir / "export" / "flow" / "ema", *GEN,
             "--out", tmp_path / "exp"))
    assert json.loads((tmp_path / "exp" / "settings.json").read_text())["sampler"] == "euler"


def _write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        img, _, _ = shapes.sample(i, 123, size)
        Image.fromarray(img).save(folder / f"img{i}.png")


def test_reconstruct_encode_decode(workdir, tmp_path):
    src = tmp_path / "in"
    _write_images(src, [16, 16, (16, 32)])
    p = _ok(_run("generate", "--workdir", workdir, "--mode", "reconstruct", "--images", src,
                 "--out", tmp_path / "rec"))
    rec = _pngs(tmp_path / "rec")
    assert sorted(rec) == ["img0.png", "img1.png", "img2.png"] and rec["img2.png"].shape == (16, 32, 3)
    printed = {ln.split(":")[0]: float(ln.split()[2]) for ln in p.stdout.splitlines()
               if ln.startswith("img")}
    for name, value in printed.items():  # the PSNR of the float output; the PNG is 8-bit
        x = grids.from_uint8(np.asarray(Image.open(src / name)))[None]
        y = grids.from_uint8(rec[name])[None]
        assert abs(float(evaluate.psnr(x, y)[0]) - value) < 0.2
    mean = float(p.stdout.split("mean PSNR ")[1].split()[0])  # of the unrounded values
    assert abs(mean - np.mean(list(printed.values()))) <= 0.01
    for suffix in ("npz", "safetensors"):
        lat = tmp_path / f"lat.{suffix}"
        _ok(_run("generate", "--workdir", workdir, "--mode", "encode", "--images", src,
                 "--latents", lat))
        if suffix == "npz":
            with np.load(lat) as z:
                assert sorted(z.files) == sorted(rec) and z["img0.png"].shape == (4 * 4 + 1, 8)
                assert z["img2.png"].shape == (4 * 8 + 1, 8)
        _ok(_run("generate", "--workdir", workdir, "--mode", "decode", "--latents", lat,
                 "--out", tmp_path / f"dec_{suffix}"))
        dec = _pngs(tmp_path / f"dec_{suffix}")
        for name in rec:  # decode(encode(x)) is the reconstruction
            assert np.abs(dec[name].astype(int) - rec[name]).max() <= 1, name


def test_user_mistakes_exit_2_with_one_line(workdir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(bad / "odd.png")
    cases = [
        (["--workdir", workdir, "--prompt", "x", "--size", "20x16", "--out", tmp_path / "o"],
         "--size 20x16"),
        (["--workdir", workdir, "--out", tmp_path / "o"], "--prompt"),
        (["--workdir", workdir, "--mode", "reconstruct", "--images", bad, "--out", tmp_path / "o"],
         "odd.png: size 20x20 is not a multiple of 16"),
        (["--workdir", workdir, "--stage", "nope", "--prompt", "x", "--out", tmp_path / "o"],
         "--stage 'nope'"),
        (["--workdir", workdir, "--export", workdir / "export" / "flow", "--prompt", "x",
          "--out", tmp_path / "o"], "exactly one of --workdir, --export or --checkpoint"),
        (["--workdir", workdir, "--stage", "vae_warmup", "--prompt", "x", "--out", tmp_path / "o"],
         "no weights for ['flow', 'text_encoder']"),
        (["--workdir", workdir, "--mode", "decode", "--latents", tmp_path / "none.npz",
          "--out", tmp_path / "o"], "--latents"),
    ]
    for args, needle in cases:
        p = _run("generate", *args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and needle in err[0], (needle, p.stderr[-2000:])
        assert "Traceback" not in p.stderr


def _lpips_file(path):
    """Random LPIPS weights in the torch layout load_lpips_weights reads."""
    params = init_lpips(jax.random.key(0))
    sd = {}
    for name, conv in params["vgg"].items():
        idx = name.split("_")[1]
        sd[f"features.{idx}.weight"] = np.ascontiguousarray(
            np.asarray(conv["kernel"]).transpose(3, 2, 0, 1))
        sd[f"features.{idx}.bias"] = np.asarray(conv["bias"])
    for k in range(5):
        v = np.asarray(params[f"lin{k}"])
        sd[f"lin{k}.model.1.weight"] = v.reshape(1, -1, 1, 1)
    save_file(sd, str(path))
    return path


def test_evaluate_command_table_json_and_agreement_with_reconstruct(workdir, tmp_path):
    js = tmp_path / "eval.json"
    p = _ok(_run("evaluate", "--workdir", workdir, "--num", "4", "--json", js,
                 "--lpips_weights", _lpips_file(tmp_path / "lpips.safetensors")))
    r = json.loads(js.read_text())
    m = r["metrics"]
    assert (r["stage"], r["weights"], r["held_out"], r["num"]) == ("flow", "ema", True, 4)
    for k in ("psnr", "ssim", "psnr_mean_image", "psnr_background", "lpips", "color_score",
              "relation_score", "color_score_data", "relation_score_data"):
        assert np.isfinite(m[f"eval/{k}"]), k
    assert m["eval/color_score_data"] == 1.0 and m["eval/relation_score_data"] == 1.0
    assert 0.0 <= m["eval/color_score"] <= 1.0 and m["eval/lpips"] >= 0.0
    table = p.stdout
    assert "psnr_mean_image" in table and "psnr_background" in table and "color_score" in table
    # the same held-out images through `generate --mode reconstruct` give the same PSNR
    ds = {"img_size": 16, "generator_seed": 0, "max_objects": 2}
    images, _ = evaluate.heldout_shapes(ds, 4)
    src = tmp_path / "heldout"
    src.mkdir()
    for i, x in enumerate(images):
        Image.fromarray(grids.to_uint8(x)).save(src / f"h{i}.png")
    rec = _ok(_run("generate", "--workdir", workdir, "--mode", "reconstruct", "--images", src,
                   "--out", tmp_path / "rec"))
    mean = float(rec.stdout.split("mean PSNR ")[1].split()[0])
    assert abs(mean - m["eval/psnr"]) < 0.01
    # the default JSON location
    _ok(_run("evaluate", "--workdir", workdir, "--stage", "vae_warmup", "--num", "2"))
    d = json.loads((workdir / "eval" / "vae_warmup.json").read_text())
    assert "eval/psnr" in d["metrics"] and "eval/color_score" not in d["metrics"]


def test_shapes_measure_script_scores_a_workdir(workdir):
    """experiments/shapes_t2i/measure.py (the demo's scorer in the README) on a trained workdir:
    it must keep running against the package's sampler API."""
    p = subprocess.run([sys.executable, "experiments/shapes_t2i/measure.py", str(workdir),
                        "--n", "8", "--seeds", "1", "--sample_steps", "2"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    _ok(p)
    res = json.loads((workdir / "measure" / "scores.json").read_text())
    assert res["stage"] == "flow" and 0.0 <= res["recon_color"] <= 1.0
    assert 0.0 <= res["gen_color"] <= 1.0 and np.isfinite(res["psnr"]["recon_spade"])
    assert res["psnr"]["baseline_flat_background"] > res["psnr"]["baseline_mean_image"]
    assert {"recon.png", "gen_single.png"} <= {f.name for f in (workdir / "measure").iterdir()}
