"""Does a LoRA trigger word learn a colour, and does DOP keep the other prompts where they were?

  python experiments/lora_shapes/run.py --base runs/demo/export/flow --out runs/lora_shapes
  python experiments/lora_shapes/run.py --size tiny --base "" --out /tmp/ls --steps 4 \
      --seeds 1 --sample_steps 2   # the CI size (tests/test_lora_e2e.py): a fresh tiny base

1. Data: ``--num_images`` single-object shapes scenes, every object in ``--color`` (default
   purple), captioned with the trigger instead of the colour ("a sks circle") - a folder + captions
   file as a user would bring.
2. Two LoRA runs of ``configs/lora.py`` from the same base through ``python -m fluxflow_jax.main``:
   DOP off (``dop_multiplier=0``) and on (``--dop``, class word "colored"). ``--base ""`` starts
   both from the same fresh initialisation (same seed): a mechanics check, not an experiment.
3. Generations (same seeds) of the base and both adapters: trigger prompts "a sks <shape>" and
   the 24 colour x shape prompts without it. Scores (experiments/shapes_t2i/measure.py's colour
   votes: saturated pixels vote for their nearest palette colour):
   * ``trigger_target_share``: fraction of the saturated pixels of trigger generations that vote
     for ``--color``; ``trigger_target_top``: fraction of those images whose top vote is it.
   * ``nontrigger_pixel_distance``: mean |image - base image| (pixels in [0, 1]) over the prompts
     without the trigger - how far the adapter moved what it should leave alone;
     ``nontrigger_vote_distance``: mean L1 distance between normalised colour-vote histograms.
Writes ``<out>/results.json``, ``<out>/grid_<model>.png`` and the two workdirs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments" / "shapes_t2i"))

from measure import color_votes, save_grid, to_u8  # the shapes colour score's vote

from fluxflow_jax import loading, lora_io, sampling
from fluxflow_jax.data import shapes


def make_data(out: Path, n: int, color: str, trigger: str, size: int, seed: int = 4242) -> Path:
    """``out/images/*.png`` + ``out/captions.txt`` (``name<TAB>a <trigger> <shape>``)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        sc = shapes.scene(i, seed, max_objects=1)
        obj = dataclasses.replace(sc.objects[0], color=color)
        img = shapes.render(dataclasses.replace(sc, objects=(obj,)), size)
        name = f"{i:04d}.png"
        Image.fromarray(img).save(out / "images" / name)
        lines.append(f"{name}\ta {trigger} {obj.shape}")
    (out / "captions.txt").write_text("\n".join(lines) + "\n")
    return out


def train(workdir: Path, base: str, data: Path, size: str, steps: int, dop: float,
          extra: list[str]) -> float:
    """One LoRA run through the user's command; returns its wall time."""
    arg = ":runlocal" if size == "tiny" else ""
    cmd = [sys.executable, "-m", "fluxflow_jax.main", f"--config=configs/lora.py{arg}",
           f"--workdir={workdir}", f"--config.init_from={base}",
           f"--config.datasets.subject.image_folder={data / 'images'}",
           f"--config.datasets.subject.captions_file={data / 'captions.txt'}",
           f"--config.stages.lora.steps={steps}",
           f"--config.stages.lora.lora.dop_multiplier={dop}", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return time.monotonic() - t0


def vote_hist(imgs_u8: np.ndarray) -> np.ndarray:
    """Normalised colour-vote histogram per image ``[N, 6]`` (all zeros: no saturated pixel)."""
    v = np.stack([color_votes(im) for im in imgs_u8]).astype(np.float64)
    return v / np.maximum(v.sum(1, keepdims=True), 1.0)


def evaluate(base: str, adapters: dict[str, Path], color: str, trigger: str, seeds: int,
             steps: int, out: Path, spade: str = "auto") -> dict:
    loaded = loading.load(export=base, needed={"text_encoder", "flow", "expander"})
    tok = loading.load_tokenizer(loaded, None)
    run_cfg = loaded.run_config or {}
    ds = loading.dataset_config(loaded)
    hw = tuple(ds["img_size"]) if ds else (32, 32)
    gen = sampling.Generator(loaded.models, tok, max_length=int(run_cfg.get("max_length", 16)),
                             image_hw=hw, settings=sampling.SampleSettings("euler", steps, 2.0),
                             use_context={"on": True, "off": False}.get(spade,
                                                                        loaded.use_context()))
    trig = [f"a {trigger} {s}" for s in shapes.SHAPES]
    plain = [f"a {c} {s}" for c in shapes.COLORS for s in shapes.SHAPES]
    prompts = [p for p in trig + plain for _ in range(seeds)]
    models = {"base": loaded.params}
    for name, f in adapters.items():
        models[name] = lora_io.apply_adapter(loaded.params, f)[0]
    target = list(shapes.COLORS).index(color)
    res: dict = {"trigger_target_share": {}, "trigger_target_top": {}, "trigger_vote_shares": {},
                 "nontrigger_pixel_distance": {}, "nontrigger_vote_distance": {}}
    imgs = {}
    for name, params in models.items():
        x = gen(params, prompts, seed=0, first_index=0)
        imgs[name] = to_u8(x)
        save_grid(imgs[name], out / f"grid_{name}.png", ncol=len(shapes.SHAPES) * seeds)
    n_trig = len(trig) * seeds
    base_h = vote_hist(imgs["base"][n_trig:])
    for name, u8 in imgs.items():
        votes = np.stack([color_votes(im) for im in u8[:n_trig]])
        res["trigger_target_share"][name] = float(votes[:, target].sum() / max(votes.sum(), 1))
        res["trigger_vote_shares"][name] = {c: round(float(votes[:, i].sum() / max(votes.sum(), 1)), 4)
                                            for i, c in enumerate(shapes.COLORS)}
        res["trigger_target_top"][name] = float(np.mean(
            (votes.sum(1) > 0) & (votes.argmax(1) == target)))
        if name != "base":
            d = np.abs(u8[n_trig:].astype(np.float64) - imgs["base"][n_trig:]) / 255.0
            res["nontrigger_pixel_distance"][name] = float(d.mean())
            res["nontrigger_vote_distance"][name] = float(np.mean(np.abs(
                vote_hist(u8[n_trig:]) - base_h).sum(1)))
    res["n_trigger_images"], res["n_plain_images"] = n_trig, len(plain) * seeds
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True,
                    help="export folder of the base model ('' = fresh weights, CI size)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="full", choices=("full", "tiny"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--num_images", type=int, default=64)
    ap.add_argument("--color", default="purple", choices=list(shapes.COLORS))
    ap.add_argument("--trigger", default="sks")
    ap.add_argument("--dop", type=float, default=1.0, help="DOP multiplier of the second run")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt")
    ap.add_argument("--sample_steps", type=int, default=16)
    ap.add_argument("--skip_train", action="store_true", help="only measure existing runs")
    ap.add_argument("--spade", default="auto", choices=("auto", "on", "off"),
                    help="decode with SPADE context (auto: the runs' samples.spade setting)")
    ap.add_argument("--set", action="append", default=[],
                    help="extra --config.x=y overrides for both runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    img_size = 16 if args.size == "tiny" else 32
    data = make_data(out / "data", args.num_images, args.color, args.trigger, img_size)
    walls = {}
    for name, dop in (("lora", 0.0), ("lora_dop", args.dop)):
        if not args.skip_train:
            walls[name] = train(out / name, args.base, data, args.size, args.steps, dop, args.set)
    adapters = {n: out / n / "export" / "lora" / lora_io.ADAPTER_FILE for n in ("lora", "lora_dop")}
    # The base as the LoRA stage re-exported it (frozen, so it equals --base; with --base '' the
    # fresh weights both runs started from) - its workdir also gives tokenizer and image size.
    res = evaluate(str(out / "lora" / "export" / "lora"), adapters, args.color, args.trigger, args.seeds, args.sample_steps,
                   out, args.spade)
    res["settings"] = {"base": args.base, "size": args.size, "steps": args.steps,
                       "num_images": args.num_images, "color": args.color,
                       "trigger": args.trigger, "dop_multiplier": args.dop, "seeds": args.seeds,
                       "sample_steps": args.sample_steps, "overrides": args.set}
    res["train_wall_s"] = walls
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
