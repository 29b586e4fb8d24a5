"""Measure what a shapes run learned: reconstruction PSNR (with baselines) and colour scores.

  python experiments/shapes_t2i/measure.py W [--stage NAME] [--n 256] [--seeds 4]

Reads the run's ``W/config.json`` (model section, tokenizer, image size, the flow stage's sampler
settings) and the weights a stage exported (``W/export/<stage>/``, the reference layout, read with
``fluxflow_jax.interop.load_any``; default: the last stage that has an export). Everything is
measured on *held-out* scenes: the shapes generator with a different ``generator_seed`` (the
training set is seed 0, indices ``< num_samples``).

Scores (all printed and written to ``W/measure/scores.json``, grids to ``W/measure/*.png``):

* ``psnr``: held-out reconstruction PSNR (dB, images in [-1, 1], data range 2) of two-object and
  one-object scenes as the training data mixes them, through the expander with SPADE context (as
  sampling uses it) and without. Beside two baselines: the mean training image, and a flat image
  of each input's own background grey (what a model that draws no shape scores).
* ``recon_color``: single-object scenes; the mean reconstructed colour inside the object's
  ground-truth mask, classified to the nearest of the 6 palette colours: fraction correct.
* ``gen_color``: generations for single-object prompts (every colour x shape, ``--seeds`` noise
  seeds each): fraction whose dominant non-background palette colour is the prompted colour
  (pixels with saturation > 50 of 255 - the backgrounds are grey - vote for their nearest palette
  colour). Chance is 1/6. Also two-object prompts from held-out scenes whose caption is not in the
  training set: fraction whose two most frequent palette colours are the two prompted colours.

Self-contained on purpose (numpy metrics): it is the measuring tool of the demo config.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fluxflow_jax import interop
from fluxflow_jax.data import load_tokenizer, shapes, tokenize
from fluxflow_jax.models.registry import build_models
from fluxflow_jax import sampling

PALETTE = np.array(list(shapes.COLORS.values()), np.float32)  # [6, 3] uint8 values
NAMES = list(shapes.COLORS)
HELD_OUT_SEED = 7919  # generator seed of the held-out scenes (training uses its own seed, 0)


def to_float(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) * (2.0 / 255.0) - 1.0


def to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR of [-1, 1] NHWC images (data range 2)."""
    mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)), axis=(1, 2, 3))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for ``[..., 3]`` uint8-scale RGB."""
    d = np.sum(np.square(rgb[..., None, :].astype(np.float32) - PALETTE), axis=-1)
    return np.argmin(d, axis=-1)


def color_votes(img_u8: np.ndarray, sat_min: int = 50) -> np.ndarray:
    """Counts per palette colour of the saturated (non-grey) pixels of one ``[H, W, 3]`` image."""
    px = img_u8.reshape(-1, 3).astype(np.int32)
    sat = px.max(1) - px.min(1)
    px = px[sat > sat_min]
    if len(px) == 0:
        return np.zeros(len(NAMES), np.int64)
    return np.bincount(nearest_color(px), minlength=len(NAMES))


def save_grid(images_u8: np.ndarray, path: Path, ncol: int, scale: int = 3) -> None:
    from PIL import Image
    n, h, w, _ = images_u8.shape
    rows = -(-n // ncol)
    g = np.zeros((rows * (h + 1) + 1, ncol * (w + 1) + 1, 3), np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        g[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = images_u8[i]
    Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST).save(path)


def variables(entry) -> dict:
    v = entry[0]
    return v if "params" in v else {"params": v}


def last_export(workdir: Path, order: list[str]) -> str:
    for name in reversed(order):
        if (workdir / "export" / name).is_dir():
            return name
    raise SystemExit(f"{workdir}/export: no stage export found (stages {order})")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--stage", default="", help="stage export to read (default: the last one)")
    ap.add_argument("--n", type=int, default=256, help="held-out reconstruction images")
    ap.add_argument("--seeds", type=int, default=4, help="noise seeds per single-object prompt")
    ap.add_argument("--sample_steps", type=int, default=0, help="default: the stage's")
    ap.add_argument("--guidance", type=float, default=-1.0, help="default: the stage's")
    args = ap.parse_args(argv)
    w = args.workdir
    cfg = json.loads((w / "config.json").read_text())
    order = list(cfg["stage_order"])
    stage = args.stage or last_export(w, order)
    ds = cfg["datasets"][cfg["default_dataset"]]
    size = int(ds["img_size"]) if not isinstance(ds["img_size"], list) else int(ds["img_size"][0])
    n_train, train_seed = int(ds.get("num_samples") or 10000), int(ds.get("generator_seed", 0))
    mcfg = dict(cfg["model"])
    tok = load_tokenizer(cfg.get("tokenizer", "demo"))
    mcfg["text"] = dict(mcfg["text"])
    if not mcfg["text"].get("vocab_size"):  # as train.stage_model_config fills it
        mcfg["text"]["vocab_size"] = len(tok)
    if getattr(tok, "pad_token_id", None) is not None:
        mcfg["text"]["pad_token_id"] = int(tok.pad_token_id)
    loaded = interop.load_any(w / "export" / stage)
    names = set(loaded) & {"compressor", "expander", "flow", "text_encoder"}
    models = build_models(mcfg, names)
    V = {k: variables(loaded[k]) for k in names}
    f = 2 ** models.compressor.downscales
    hw = (size // f, size // f)
    out = w / "measure"
    out.mkdir(exist_ok=True)
    res: dict = {"workdir": str(w), "stage": stage, "image_size": size, "latent_grid": list(hw)}

    @jax.jit
    def recon(x):
        packed, mu, _ = models.compressor.apply(V["compressor"], x, sample=False)
        ctx = models.expander.apply(V["expander"], packed, use_context=True, hw=hw)
        noctx = models.expander.apply(V["expander"], packed, use_context=False, hw=hw)
        return ctx, noctx, mu

    # --- reconstruction PSNR on held-out scenes (the training mix of 1- and 2-object scenes)
    scenes = [shapes.scene(i, HELD_OUT_SEED, 2) for i in range(args.n)]
    x = to_float(np.stack([shapes.render(s, size) for s in scenes]))
    ctx, noctx, mu = (np.asarray(a) for a in recon(jnp.asarray(x)))
    train_mean = np.mean(to_float(np.stack(
        [shapes.render(shapes.scene(i, train_seed, 2), size) for i in range(min(n_train, 1024))])),
        axis=0)
    bg = to_float(np.stack([np.broadcast_to(np.array(s.background, np.uint8), (size, size, 3))
                            for s in scenes]))
    res["psnr"] = {"recon_spade": float(psnr(ctx, x).mean()),
                   "recon_no_spade": float(psnr(noctx, x).mean()),
                   "baseline_mean_image": float(psnr(np.broadcast_to(train_mean, x.shape), x).mean()),
                   "baseline_flat_background": float(psnr(bg, x).mean())}
    res["latent"] = {"mu_mean": float(mu.mean()), "mu_std": float(mu.std())}
    k = min(16, args.n)
    save_grid(to_u8(np.concatenate([x[:k], ctx[:k], noctx[:k]])), out / "recon.png", k)

    # --- recon colour score: single-object held-out scenes
    singles = [shapes.scene(i, HELD_OUT_SEED + 1, 1) for i in range(120)]
    xs = to_float(np.stack([shapes.render(s, size) for s in singles]))
    rs = np.asarray(recon(jnp.asarray(xs))[0])
    hits = []
    for s, r in zip(singles, to_u8(rs)):
        m = shapes.object_mask(s.objects[0], size)
        hits.append(NAMES[int(nearest_color(r[m].astype(np.float32).mean(0)))] == s.objects[0].color)
    res["recon_color"] = float(np.mean(hits))

    # --- generations
    if {"flow", "text_encoder"} <= names:
        st = cfg["stages"].get(stage, {})
        steps = args.sample_steps or int(st.get("sample_steps", 20))
        g = args.guidance if args.guidance >= 0 else float(st.get("guidance_scale", 3.0))
        null_mode = st.get("loss", {}).get("cfg_null", "zeros")
        L = int(cfg.get("max_length", 16))
        e_ids, e_mask = tokenize(tok, [""], L)
        settings = sampling.SampleSettings(sampling.stage_settings(st).sampler, steps, g)
        null_ids = ((jnp.asarray(e_ids), jnp.asarray(e_mask)) if null_mode == "empty_prompt"
                    else None)
        params = {k: v["params"] for k, v in V.items()}
        gen = jax.jit(lambda ids, mask, keys: sampling.text_to_image(
            models, params, ids, mask, keys, image_hw=(size, size), settings=settings,
            null_ids=null_ids, use_context=True))

        def generate(prompts, seed):
            ids, mask = tokenize(tok, prompts, L)
            key = jax.random.key(seed, impl=cfg.get("rng_impl", "threefry2x32"))
            keys = sampling.image_keys(key, np.arange(len(prompts)))
            return to_u8(np.asarray(gen(jnp.asarray(ids), jnp.asarray(mask), keys)))

        singles_p = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c in NAMES
                     for s in shapes.SHAPES]
        prompts = singles_p * args.seeds
        imgs = generate(prompts, 1000)
        per_color = {c: [] for c in NAMES}
        for p, im in zip(prompts, imgs):
            v = color_votes(im)
            ok = v.sum() > 0 and NAMES[int(np.argmax(v))] == p.split()[1]
            per_color[p.split()[1]].append(ok)
        res["gen_color"] = float(np.mean([o for v in per_color.values() for o in v]))
        res["gen_color_per_color"] = {c: float(np.mean(v)) for c, v in per_color.items()}
        # rows: colours (palette order), columns: shapes; one row block per seed
        save_grid(imgs, out / "gen_single.png", len(shapes.SHAPES))
        # two-object prompts from held-out scenes, captions not seen in training
        seen = {shapes.scene(i, train_seed, 2).caption for i in range(n_train)}
        two = []
        i = 0
        while len(two) < 48:
            s = shapes.scene(10_000 + i, HELD_OUT_SEED, 2)
            i += 1
            if s.relation is not None and s.caption not in seen:
                two.append(s)
        imgs2 = generate([s.caption for s in two], 2000)
        ok2 = []
        for s, im in zip(two, imgs2):
            v = color_votes(im)
            top = {NAMES[j] for j in np.argsort(-v)[:2] if v[j] > 0}
            ok2.append(top == {o.color for o in s.objects})
        res["gen_color_two_objects_both"] = float(np.mean(ok2))
        res["gen"] = {"sample_steps": steps, "guidance": g, "cfg_null": null_mode,
                      "n_single": len(prompts), "n_two": len(two)}
        save_grid(imgs2[:16], out / "gen_two.png", 8)
        (out / "gen_two_prompts.txt").write_text("\n".join(s.caption for s in two[:16]) + "\n")
    (out / "scores.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    t0 = time.time()
    main(sys.argv[1:])
    print(f"measured in {time.time() - t0:.0f} s", file=sys.stderr)
