"""Images from trained weights: prompts -> images, and the VAE's reconstruct / encode / decode.

  python -m fluxflow_jax.generate --workdir W [--stage S] [--weights auto|ema|raw] \\
      --prompt "a red circle above a blue square" [--prompt ...] [--prompts_file F] \\
      [--negative TEXT] [--steps N] [--guidance G] [--sampler euler|heun|vpred] [--size WxH] \\
      [--seed S] [--num K] [--lora ADAPTER.safetensors [--lora_scale S]] --out DIR
  python -m fluxflow_jax.generate --export W/export/flow ...        # an export folder
  python -m fluxflow_jax.generate --checkpoint flxflow_final.safetensors \\
      --checkpoint text_encoder.safetensors --tokenizer DIR ...      # reference files
  python -m fluxflow_jax.generate --workdir W --mode reconstruct --images DIR_IN --out DIR
  python -m fluxflow_jax.generate --workdir W --mode encode --images DIR_IN --latents L.npz
  python -m fluxflow_jax.generate --workdir W --mode decode --latents L.npz --out DIR

Generation writes ``DIR/<nnn>_<prompt>.png`` per image (K per prompt), ``DIR/grid.png`` (one row
per prompt, captioned) and ``DIR/settings.json`` (everything needed to make them again). Defaults
come from the run: the sampler matching the stage's objective (``vpred`` for the reference's
v-prediction, ``euler`` for flow matching), its ``sample_steps``, ``guidance_scale`` and
``cfg_null``, its dataset's image size; reference checkpoints default to ``vpred``, zero null
embedding, 64x64. Reconstruct writes ``DIR/<input file name>`` per image (posterior mean, SPADE
on) and prints each PSNR and their mean. Latent files (.npz or .safetensors) map each input file
name to its packed latent ``[h*w+1, d]`` (HW token last). ``--lora`` merges a LoRA adapter file
(``lora_io``: what a LoRA stage writes to ``W/export/<stage>/lora.safetensors``) into the flow model
at ``lora_scale * alpha / rank`` (0 = the base model). Mistakes exit 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from safetensors.numpy import load_file, save_file

from fluxflow_jax import evaluate, grids, interop, loading, lora_io, sampling, xla
from fluxflow_jax.loading import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
NEEDED = {"generate": {"text_encoder", "flow", "expander"},
          "reconstruct": {"compressor", "expander"}, "encode": {"compressor"},
          "decode": {"expander"}}


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """``'WxH'`` (or ``'N'``) -> ``(H, W)``; both must be positive multiples of 16."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not m:
        raise UserError(f"{flag} {text!r}: expected WxH, e.g. 64x48")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise UserError(f"{flag} {text}: width and height must be positive multiples of 16 "
                        f"(e.g. {max(16, w // 16 * 16)}x{max(16, h // 16 * 16)})")
    return h, w


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the non-empty lines of ``--prompts_file``."""
    out = [p for p in prompts or []]
    if prompts_file:
        p = Path(prompts_file)
        if not p.is_file():
            raise UserError(f"--prompts_file {p}: file not found")
        out += [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not out:
        raise UserError("no prompts: give --prompt TEXT (repeatable) or --prompts_file FILE")
    return out


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


def read_images(folder: str | Path, multiple: int) -> list[tuple[str, np.ndarray]]:
    """``[(file name, [H, W, 3] float32 in [-1, 1])]`` of the images in ``folder``, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), np.uint8)
        h, w = arr.shape[:2]
        if h % multiple or w % multiple:
            raise UserError(f"--images {p}: size {w}x{h} is not a multiple of {multiple}; crop "
                            f"or resize it (e.g. to {max(multiple, w // multiple * multiple)}x"
                            f"{max(multiple, h // multiple * multiple)})")
        out.append((p.name, grids.from_uint8(arr)))
    return out


def _by_size(items: Sequence[tuple[str, np.ndarray]]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, (_, a) in enumerate(items):
        groups.setdefault(a.shape, []).append(i)
    return groups


def _save_image(img: np.ndarray, path: Path) -> Path:
    """[-1, 1] HWC -> an image file in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grids.to_uint8(img)).save(path)
    return path


def run_generate(loaded: loading.Loaded, args: argparse.Namespace) -> dict:
    """Generate ``--num`` images per prompt into ``--out``; returns the settings written."""
    prompts = read_prompts(args.prompt, args.prompts_file)
    stage = loaded.stage_config()
    loss = stage.get("loss", {})
    if args.size:
        image_hw = parse_size(args.size)
    else:
        ds = loading.dataset_config(loaded)
        image_hw = tuple(ds["img_size"]) if ds else (64, 64)
    default_sampler = ("vpred" if not loaded.run_config else
                       stage.get("sampler") or
                       sampling.sampler_for_objective(loss.get("objective", "flow_matching")))
    settings = sampling.SampleSettings(
        sampler=args.sampler or default_sampler,
        steps=int(args.steps or stage.get("sample_steps") or 20),
        guidance=float(args.guidance if args.guidance is not None
                       else stage.get("guidance_scale", 1.0)))
    tok = loading.load_tokenizer(loaded, args.tokenizer)
    null = loss.get("cfg_null", "zeros")
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    rng_impl = args.rng_impl or (loaded.run_config or {}).get("rng_impl") or "threefry2x32"
    gen = sampling.Generator(loaded.models, tok, max_length=loading.max_length(loaded,
                             args.max_length), image_hw=image_hw, settings=settings, null=null,
                             negative=args.negative, rng_impl=rng_impl,
                             use_context=_use_context(loaded, args))
    all_prompts = [p for p in prompts for _ in range(args.num)]
    params, lora_info = loaded.params, None
    if args.lora:
        params, meta = lora_io.apply_adapter(params, args.lora, args.lora_scale)
        lora_info = {"file": str(args.lora), "scale": args.lora_scale, **meta}
    images = gen(params, all_prompts, args.seed)
    out = Path(args.out)
    files = [str(_save_image(img, out / f"{i:03d}_{_slug(p)}.png").name)
             for i, (p, img) in enumerate(zip(all_prompts, images))]
    grids.save_grid(images, out / "grid.png", nrow=args.num, captions=all_prompts, min_tile=128)
    info = {"prompts": prompts, "negative": args.negative, "num": args.num, "seed": args.seed,
            "sampler": settings.sampler, "steps": settings.steps, "guidance": settings.guidance,
            "null": "negative prompt" if args.negative is not None else null,
            "size": f"{image_hw[1]}x{image_hw[0]}", "source": loaded.source,
            "stage": loaded.stage, "weights": loaded.weights, "rng_impl": rng_impl,
            "spade_context": _use_context(loaded, args), "lora": lora_info, "files": files}
    (out / "settings.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {len(files)} images, grid.png and settings.json to {out}")
    return info


def run_reconstruct(loaded: loading.Loaded, args: argparse.Namespace) -> dict[str, float]:
    """Reconstruct every image of ``--images`` into ``--out``; returns PSNR per file name."""
    multiple = max(16, 2 ** loaded.models.compressor.downscales)
    items = read_images(_need(args.images, "--images"), multiple)
    out = Path(_need(args.out, "--out"))
    ctx = _use_context(loaded, args)
    fn = xla.jit(lambda p, x: sampling.reconstruct(loaded.models, p, x, use_context=ctx))
    scores: dict[str, float] = {}
    for idx in _by_size(items).values():
        x = np.stack([items[i][1] for i in idx])
        y = np.asarray(fn(loaded.params, x))
        for j, i in enumerate(idx):
            name = items[i][0]
            _save_image(y[j], out / name)
            scores[name] = float(evaluate.psnr(x[j:j + 1], y[j:j + 1])[0])
    for name in sorted(scores):
        print(f"{name}: PSNR {scores[name]:.2f} dB")
    print(f"mean PSNR {np.mean(list(scores.values())):.2f} dB over {len(scores)} images")
    return scores


def save_latents(path: str | Path, latents: dict[str, np.ndarray]) -> Path:
    """``{name: [T+1, d]}`` -> .npz or .safetensors (by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in latents.items()}
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    elif path.suffix == ".safetensors":
        save_file(arrays, str(path))
    else:
        raise UserError(f"--latents {path}: use a .npz or .safetensors file name")
    return path


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--latents {path}: file not found")
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: np.asarray(z[k], np.float32) for k in z.files}
    if path.suffix == ".safetensors":
        return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    raise UserError(f"--latents {path}: use a .npz or .safetensors file")


def run_encode(loaded: loading.Loaded, args: argparse.Namespace) -> dict[str, np.ndarray]:
    comp = loaded.models.compressor
    items = read_images(_need(args.images, "--images"), max(16, 2 ** comp.downscales))
    fn = xla.jit(lambda p, x: comp.apply({"params": p}, x, sample=False)[0])
    lat = {}
    for idx in _by_size(items).values():
        y = np.asarray(fn(loaded.params["compressor"], np.stack([items[i][1] for i in idx])))
        lat.update({items[i][0]: y[j] for j, i in enumerate(idx)})
    p = save_latents(_need(args.latents, "--latents"), lat)
    print(f"wrote {len(lat)} latents to {p}")
    return lat


def run_decode(loaded: loading.Loaded, args: argparse.Namespace) -> list[Path]:
    exp = loaded.models.expander
    lat = load_latents(_need(args.latents, "--latents"))
    out = Path(_need(args.out, "--out"))
    ctx = _use_context(loaded, args)
    fn = xla.jit(lambda p, x, hw: exp.apply({"params": p}, x, use_context=ctx, hw=hw),
                 static_argnums=2)
    written = []
    for name, packed in lat.items():
        if packed.ndim != 2 or packed.shape[1] != exp.d_model:
            raise UserError(f"--latents: {name!r} has shape {packed.shape}, expected "
                            f"[tokens, {exp.d_model}] for this expander")
        hw = tuple(int(v) for v in np.maximum(np.round(packed[-1, :2] * exp.max_hw), 1))
        img = fn(loaded.params["expander"], packed[None], hw)
        written.append(_save_image(np.asarray(img)[0], out / f"{Path(name).stem}.png"))
    print(f"wrote {len(written)} images to {out}")
    return written


def _need(value, flag: str):
    if not value:
        raise UserError(f"{flag} is required for this --mode")
    return value


def _use_context(loaded: loading.Loaded, args: argparse.Namespace) -> bool:
    """``--spade on|off``, else what the weights were trained with (``Loaded.use_context``)."""
    return {"on": True, "off": False}.get(args.spade, loaded.use_context())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fluxflow_jax.generate",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="generate", choices=sorted(NEEDED))
    src = ap.add_argument_group("weights (exactly one source)")
    src.add_argument("--workdir")
    src.add_argument("--stage")
    src.add_argument("--weights", default="auto", choices=loading.WEIGHTS)
    src.add_argument("--export")
    src.add_argument("--checkpoint", action="append", default=[])
    ap.add_argument("--tokenizer", help="local tokenizer dir or 'demo' (default: the run's)")
    ap.add_argument("--max_length", type=int)
    ap.add_argument("--prompt", action="append", default=[])
    ap.add_argument("--prompts_file")
    ap.add_argument("--negative")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--sampler", choices=sampling.SAMPLERS)
    ap.add_argument("--size", help="WxH, multiples of 16")
    ap.add_argument("--spade", default="auto", choices=("auto", "on", "off"),
                    help="decode with SPADE context: 'auto' = when the run trained it (reference "
                         "files: on, as the reference decodes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rng_impl", choices=RNG_IMPLS,
                    help="PRNG of the noise (default: the run's, else threefry2x32)")
    ap.add_argument("--num", type=int, default=1, help="images per prompt")
    ap.add_argument("--images", help="input image folder (reconstruct, encode)")
    ap.add_argument("--latents", help="latent file .npz|.safetensors (encode, decode)")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--lora", help="LoRA adapter file (.safetensors) to merge into the flow model")
    ap.add_argument("--lora_scale", type=float, default=1.0,
                    help="multiplies the adapter's alpha/rank (0 = base model)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    xla.configure_cpu_host()
    xla.enable_compilation_cache()
    try:
        if args.mode in ("generate", "reconstruct", "decode"):
            _need(args.out, "--out")
        loaded = loading.load(workdir=args.workdir, stage=args.stage, export=args.export,
                              checkpoint=args.checkpoint, weights=args.weights,
                              needed=NEEDED[args.mode])
        {"generate": run_generate, "reconstruct": run_reconstruct, "encode": run_encode,
         "decode": run_decode}[args.mode](loaded, args)
    except (UserError, FileNotFoundError, interop.InteropError, lora_io.AdapterFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
