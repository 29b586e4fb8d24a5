"""Compile time, steady-state step time and peak memory of the VAE, discriminator and flow steps.

    python benchmarks/step_times.py                       # tiny,small on whatever device is there
    python benchmarks/step_times.py --sizes tiny,small,medium,phase1 --batch 8 --steps 20
    python benchmarks/step_times.py --bf16 --remat        # compute dtype / rematerialisation

Each (size, step) is built exactly as training builds it (registry models, optim factories with
the reference's default optimizers, steps.make_*_step, sharding over all devices), compiled once
(``init_s``: wall time of ``registry.init_params``, with ``--init_ab`` also under a plain
``jax.jit``, run second; ``compile_s``: the first call's wall time - trace, lower, XLA compile
and one step - minus the mean step), then timed over ``--steps`` calls (``step_ms``: mean and
min wall time per step, each call blocked until its metrics are ready).
Peak memory: ``device.memory_stats()['peak_bytes_in_use']`` where the backend reports it (GPU,
TPU), else the process's peak RSS (CPU; a high-water mark over the whole run, so later rows
include earlier ones). Results go to ``benchmarks/results/step_times.json`` and a table on stdout.
The default run (tiny, small; batch 2; 5 steps) takes ~3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

from fluxflow_jax import optim, sharding, steps, xla
from fluxflow_jax.models import registry
from fluxflow_jax.state import create_train_state

TEXT = {"vocab_size": 1000, "max_position_embeddings": 64, "dropout": 0.0, "pooling": "mean",
        "freeze_backbone": False}


def _model(vae_dim, downscales, attn, flow, emb, disc, text):
    """attn = (layers, heads); flow = (dim, layers, heads); disc = (base_ch, depth);
    text = (dim, layers, heads, hidden)."""
    return {"vae_dim": vae_dim, "downscales": downscales, "upscales": downscales,
            "vae_attn_layers": attn[0], "vae_attn_heads": attn[1], "flow_dim": flow[0],
            "flow_layers": flow[1], "flow_heads": flow[2], "text_embedding_dim": emb,
            "disc": {"base_ch": disc[0], "depth": disc[1]},
            "text": dict(TEXT, dim=text[0], n_layers=text[1], n_heads=text[2],
                         hidden_dim=text[3])}


SIZES = {
    "tiny": {"image": 32, "text_len": 8,
             "model": _model(8, 2, (1, 2), (16, 1, 2), 16, (4, 2), (16, 1, 2, 32))},
    "small": {"image": 64, "text_len": 16,
              "model": _model(16, 4, (1, 2), (32, 2, 2), 32, (8, 2), (32, 1, 2, 64))},
    "medium": {"image": 128, "text_len": 32,
               "model": _model(32, 4, (2, 4), (64, 4, 4), 64, (16, 3), (64, 2, 4, 128))},
    # The reference's training size (REFERENCE.md 1.9): for accelerators.
    "phase1": {"image": 256, "text_len": 128,
               "model": _model(128, 4, (4, 8), (128, 10, 8), 1024, (64, 4),
                               (768, 6, 12, 3072))},
}
SIZES["phase1"]["model"]["text"].update(vocab_size=30522, max_position_embeddings=512)
GROUP = {"vae": "vae", "disc": "discriminator", "flow": "flow"}


def peak_memory() -> tuple[int, str]:
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except (RuntimeError, NotImplementedError):  # some backends raise instead of None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(max(d.memory_stats()["peak_bytes_in_use"] for d in jax.local_devices())), \
            "device_peak_bytes_in_use"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process_peak_rss"


def n_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def bench_size(name: str, batch: int, n_steps: int, bf16: bool, remat: bool,
               init_ab: bool = False) -> list[dict]:
    spec = SIZES[name]
    model_cfg = dict(spec["model"], max_hw=1024, activation="bezier", remat=remat,
                     dtype="bfloat16" if bf16 else "float32")
    models = registry.build_models(model_cfg, set(registry.MODEL_NAMES))
    hw, tl = spec["image"], spec["text_len"]
    t0 = time.perf_counter()
    params, spectral = registry.init_params(models, jax.random.key(0), (hw, hw), tl)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    init_plain_s = None
    if init_ab:  # the same init under a plain jax.jit (xla.jit_once's baseline)
        t0 = time.perf_counter()
        jax.block_until_ready(registry.init_params(models, jax.random.key(0), (hw, hw), tl,
                                                   jit=jax.jit))
        init_plain_s = round(time.perf_counter() - t0, 3)
        print(f"  {name:7s} init  {init_s:7.2f} s (xla.jit_once), {init_plain_s:7.2f} s "
              "(jax.jit)", flush=True)
    txs = {k: optim.make_optimizer(optim.default_optimizer_config(g), None, 10_000,
                                   name=f"optimizers.{g}") for k, g in GROUP.items()}
    mesh = sharding.make_mesh()
    state = create_train_state(params, txs, spectral=spectral)
    sh = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, sh)
    r = np.random.default_rng(0)
    host = {"image": r.uniform(-1, 1, (batch, hw, hw, 3)).astype(np.float32),
            "input_ids": r.integers(1, 1000, (batch, tl)).astype(np.int32),
            "attention_mask": np.ones((batch, tl), np.int32)}
    gbatch = sharding.put_batch(host, mesh)
    loss_cfg = {"use_gan": True, "adaptive_weights": True, "train_text_encoder": False,
                "cfg_dropout_prob": 0.1}
    makers = {"vae": steps.make_vae_step, "disc": steps.make_disc_step,
              "flow": steps.make_flow_step}
    rng = jax.random.key(1)
    rows = []
    for kind in ("vae", "disc", "flow"):
        fn = makers[kind](models, txs[kind], loss_cfg, mesh, sh, advance_step=True)
        t0 = time.perf_counter()
        state, m = fn(state, gbatch, rng)  # trace + compile + one step
        jax.block_until_ready(m)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(n_steps):
            t0 = time.perf_counter()
            state, m = fn(state, gbatch, rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        compile_s = max(0.0, first_s - float(np.mean(times)))
        mem, src = peak_memory()
        trained = steps.step_params(kind, params)
        loss_key = {"vae": "train/loss_vae", "disc": "train/loss_d", "flow": "train/loss_flow"}
        rows.append({"size": name, "step": kind, "image": hw, "batch": batch, "bf16": bf16,
                     "remat": remat, "init_s": round(init_s, 3),
                     "init_plain_jit_s": init_plain_s,
                     "compile_s": round(compile_s, 3),
                     "step_ms_mean": round(1e3 * float(np.mean(times)), 3),
                     "step_ms_min": round(1e3 * float(np.min(times)), 3),
                     "peak_mem_bytes": mem, "mem_source": src,
                     "trained_params": n_params(trained),
                     "loss": float(m[loss_key[kind]]), "nonfinite": int(state.nonfinite)})
        print(f"  {name:7s} {kind:5s} compile {compile_s:7.2f} s  step "
              f"{rows[-1]['step_ms_mean']:9.2f} ms  peak {mem / 2**20:8.1f} MiB ({src})",
              flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="tiny,small",
                    help=f"comma list of {','.join(SIZES)} (default: tiny,small)")
    ap.add_argument("--batch", type=int, default=2, help="global batch (default 2)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per step kind")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute (fp32 params)")
    ap.add_argument("--remat", action="store_true", help="rematerialise blocks")
    ap.add_argument("--init_ab", action="store_true",
                    help="also time the parameter init under a plain jax.jit (init_plain_jit_s)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_times.json"))
    args = ap.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        ap.error(f"unknown size(s) {bad}; choose from {list(SIZES)}")
    host = xla.configure_cpu_host()  # as the entry points do
    dev = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}); jax "
          f"{jax.__version__}; CPU host runtime: {host}", flush=True)
    rows = []
    for s in sizes:
        rows += bench_size(s, args.batch, args.steps, args.bf16, args.remat, args.init_ab)
    print(f"\n{'size':7s} {'step':5s} {'img':>4s} {'B':>3s} {'compile s':>10s} "
          f"{'step ms':>9s} {'min ms':>9s} {'peak MiB':>9s}")
    for r in rows:
        print(f"{r['size']:7s} {r['step']:5s} {r['image']:4d} {r['batch']:3d} "
              f"{r['compile_s']:10.2f} {r['step_ms_mean']:9.2f} {r['step_ms_min']:9.2f} "
              f"{r['peak_mem_bytes'] / 2**20:9.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": f"{jax.device_count()} x {dev.device_kind}", "platform": dev.platform,
            "jax": jax.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "argv": sys.argv[1:]}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
