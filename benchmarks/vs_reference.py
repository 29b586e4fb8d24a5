"""fluxflow_jax vs the PyTorch reference: training-step time of the same models on this CPU.

    python benchmarks/vs_reference.py                      # default cases, ~3.5 min on 2 cores
    python benchmarks/vs_reference.py --cases vae16,flow --steps 10
    python benchmarks/vs_reference.py --cases disc --dynamics 300   # + training dynamics (~10 min)

The reference runs in its own torch environment (``--torch_python``, default
/tmp/refvenv/bin/python) through ``benchmarks/_torch_worker.py``, which imports the model (and
trainer) files of the exported reference sources (``--ref_src``, default /tmp/refsrc). Neither
is a dependency of this package. Setting them up:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch numpy safetensors einops
    mkdir -p /tmp/refsrc/core /tmp/refsrc/training
    git -C <fluxflow-core clone> archive HEAD | tar -x -C /tmp/refsrc/core
    git -C <fluxflow-training clone> archive HEAD | tar -x -C /tmp/refsrc/training

For every case both sides train *the same model from the same weights*: fluxflow_jax
initialises it, the weights go to the worker in the reference's state-dict layout
(``fluxflow_jax.interop``) and are loaded with ``strict`` key checking, and both sides get the
same inputs (NHWC here, NCHW contiguous for torch, the layout the reference's loader gives).
One step is forward + loss + backward + Adam(lr 1e-4) update, fp32:

* ``vae*``: compressor (always samples, as the reference) + expander with SPADE, L1 loss;
* ``flow``: flow processor on packed latents, MSE against a fixed target;
* ``disc``: patch discriminator (spectral norm, projection context), hinge loss on a real and a
  fake batch (two forward passes).

Times: each side in turn on the same ``--threads`` cores (the process is pinned to them, which
sizes XLA's thread pool; torch.set_num_threads in the worker), ``--rounds`` alternations of
``--warmup`` + ``--steps`` steps per side; median (and min) over the pooled timed steps. Ours is
one jitted step (donated state) blocked until done; ``compile s`` is our first call (trace + XLA
compile + one step) minus a median step. ``ref/ours`` > 1 means fluxflow_jax is faster. On a
shared 2-core VM repeated runs differ by up to ~15%; read ratios within 0.85-1.15 as parity.
Checks: both sides must count the same parameters (else the run stops), and the first-step
losses are printed side by side (flow and disc agree to 5 digits; the VAE's differ slightly by
its posterior sample).
The reference's gradient checkpointing (VAE: on by default, flow: always on) recomputes
forwards in backward; ``--ref_grad_ckpt`` turns the VAE's on (default off, the reference's
fastest setting). Results: a table on stdout and ``benchmarks/results/vs_reference.json``.

``--dynamics N`` also trains the demo config's VAE warm-up stage for N steps on both sides from
the same weights on the same shapes batches (ours: the engine's optimizer factory and VAE step;
the reference: its own ``VAETrainer.train_step``) and prints both reconstruction-loss curves;
``--dynamics_loss '{"adaptive_weights": true}'`` changes a loss setting on both sides (that one
restores the reference's default, which the demo config turns off).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_torch_worker.py"

# name -> {kind, config (both sides' constructor settings), image or tokens (h, w), batch}
CASES: dict[str, dict] = {
    "vae16": {"kind": "vae", "image": 64, "batch": 2,
              "config": {"vae_dim": 16, "downscales": 4, "attn_layers": 2, "attn_heads": 2}},
    "vae32": {"kind": "vae", "image": 64, "batch": 2,
              "config": {"vae_dim": 32, "downscales": 4, "attn_layers": 2, "attn_heads": 4}},
    # The reference's Phase 1 flow model at 256 px (16x16 = 256 latent tokens).
    "flow": {"kind": "flow", "tokens": (16, 16), "batch": 2,
             "config": {"flow_dim": 128, "vae_dim": 128, "embedding": 1024, "heads": 8,
                        "layers": 10}},
    "disc": {"kind": "disc", "image": 64, "batch": 2,
             "config": {"base_ch": 16, "depth": 3, "ctx_dim": 16}},
}


def size_label(case: dict) -> str:
    c = case["config"]
    if case["kind"] == "vae":
        return (f"VAE d={c['vae_dim']} ds={c['downscales']} attn={c['attn_layers']}x"
                f"{c['attn_heads']}h {case['image']}px B{case['batch']}")
    if case["kind"] == "flow":
        h, w = case["tokens"]
        return (f"flow D={c['flow_dim']} L={c['layers']} d={c['vae_dim']} T={h * w} "
                f"B{case['batch']}")
    return (f"disc base={c['base_ch']} depth={c['depth']} {case['image']}px B{case['batch']}")


# ---------------------------------------------------------------------------------------------
# our side


def build_case(case: dict, seed: int = 0):
    """``(params, extra_state, loss_fn(params, extra, key) -> (loss, new_extra), inputs,
    torch_weights)`` for one case; ``inputs`` holds NHWC numpy arrays shared with the worker."""
    import jax
    import jax.numpy as jnp

    from fluxflow_jax.interop import discriminator as idisc
    from fluxflow_jax.interop import flow as iflow
    from fluxflow_jax.interop import vae as ivae
    from fluxflow_jax.models import registry

    kind, c, b = case["kind"], case["config"], case["batch"]
    r = np.random.default_rng(seed)
    key = jax.random.key(seed)
    if kind == "vae":
        models = registry.build_models(
            {"vae_dim": c["vae_dim"], "downscales": c["downscales"], "upscales": c["downscales"],
             "vae_attn_layers": c["attn_layers"], "vae_attn_heads": c["attn_heads"]},
            {"compressor", "expander"})
        hw = (case["image"], case["image"])
        params, _ = registry.init_params(models, key, hw)
        lat = registry.latent_hw(models, hw)
        img = r.uniform(-1, 1, (b, *hw, 3)).astype(np.float32)
        inputs = {"image": img}
        comp, expd = models.compressor, models.expander

        def loss_fn(p, extra, k):
            packed, _, _ = comp.apply({"params": p["compressor"]}, extra["image"], sample=True,
                                      rngs={"sample": k})
            rec = expd.apply({"params": p["expander"]}, packed, use_context=True, hw=lat)
            return jnp.mean(jnp.abs(rec - extra["image"])), extra

        tw = {**ivae.compressor_to_torch({"params": params["compressor"]}, prefix="compressor."),
              **ivae.expander_to_torch({"params": params["expander"]}, prefix="expander.")}
        return params, {"image": jnp.asarray(img)}, loss_fn, inputs, tw
    if kind == "flow":
        models = registry.build_models(
            {"vae_dim": c["vae_dim"], "flow_dim": c["flow_dim"], "flow_layers": c["layers"],
             "flow_heads": c["heads"], "text_embedding_dim": c["embedding"]}, {"flow"})
        h, w = case["tokens"]
        flow = models.flow
        params = {"flow": flow.init(key, jnp.zeros((1, h * w + 1, c["vae_dim"])),
                                    jnp.zeros((1, c["embedding"])), jnp.zeros((1,)),
                                    hw=(h, w))["params"]}
        packed = r.standard_normal((b, h * w + 1, c["vae_dim"])).astype(np.float32)
        packed[:, -1, :] = 0.0
        packed[:, -1, 0], packed[:, -1, 1] = h / 1024.0, w / 1024.0  # the HW token
        inputs = {"packed": packed,
                  "text_emb": r.standard_normal((b, c["embedding"])).astype(np.float32),
                  "t": r.uniform(0.05, 0.95, (b,)).astype(np.float32),
                  "target": r.standard_normal((b, h * w, c["vae_dim"])).astype(np.float32)}

        def loss_fn(p, extra, k):
            out = flow.apply({"params": p["flow"]}, extra["packed"], extra["text_emb"],
                             extra["t"], hw=(h, w))
            return jnp.mean(jnp.square(out[:, :-1] - extra["target"])), extra

        cfg = {"d_model": c["flow_dim"], "vae_dim": c["vae_dim"], "embedding_size": c["embedding"],
               "n_head": c["heads"], "n_layers": c["layers"], "max_hw": 1024, "ctx_tokens": 4}
        tw = iflow.flow_to_torch({"params": params["flow"]}, cfg, prefix="flow.")
        return params, {k: jnp.asarray(v) for k, v in inputs.items()}, loss_fn, inputs, tw
    if kind == "disc":
        models = registry.build_models(
            {"vae_dim": c["ctx_dim"], "disc": {"base_ch": c["base_ch"], "depth": c["depth"]}},
            {"discriminator"})
        hw = (case["image"], case["image"])
        params, spectral = registry.init_params(models, key, hw)
        disc = models.discriminator
        inputs = {"real": r.uniform(-1, 1, (b, *hw, 3)).astype(np.float32),
                  "fake": r.uniform(-1, 1, (b, *hw, 3)).astype(np.float32),
                  "ctx": r.standard_normal((b, c["ctx_dim"])).astype(np.float32)}

        def per_sample(x):
            return x.reshape(x.shape[0], -1).mean(1)

        def loss_fn(p, extra, k):
            # Spectral-norm power iterations advance on each call, as torch's in train mode.
            lr_, upd = disc.apply({"params": p["discriminator"], "spectral": extra["spectral"]},
                                  extra["real"], extra["ctx"], train=True, mutable=["spectral"])
            lf, upd = disc.apply({"params": p["discriminator"], "spectral": upd["spectral"]},
                                 extra["fake"], extra["ctx"], train=True, mutable=["spectral"])
            loss = (jnp.mean(jax.nn.relu(1.0 - per_sample(lr_)))
                    + jnp.mean(jax.nn.relu(1.0 + per_sample(lf))))
            return loss, {**extra, "spectral": upd["spectral"]}

        tw = idisc.disc_to_torch({"params": params["discriminator"], "spectral": spectral},
                                 prefix="discriminator.")
        extra = {k: jnp.asarray(v) for k, v in inputs.items()}
        extra["spectral"] = spectral
        return params, extra, loss_fn, inputs, tw
    raise ValueError(f"unknown case kind {kind!r}")


class Ours:
    """Our jitted train step of one case: ``compile()`` once, then ``time(warmup, steps)``."""

    def __init__(self, case: dict):
        import jax
        import optax

        params, extra, loss_fn, self.inputs, self.torch_weights = build_case(case)
        tx = optax.adam(1e-4)

        def step(params, opt_state, extra, key):
            (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, extra, loss

        self.carry = (params, tx.init(params), extra)
        self.step = jax.jit(step, donate_argnums=(0, 1, 2))
        self.key, self.i = jax.random.key(1), 0
        self.n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

    def _run(self):
        import jax

        *self.carry, loss = self.step(*self.carry, jax.random.fold_in(self.key, self.i))
        self.i += 1
        return float(jax.block_until_ready(loss))

    def compile(self) -> tuple[float, float]:
        """``(first call's wall time: trace + compile + one step, its loss)``."""
        t0 = time.perf_counter()
        loss0 = self._run()
        return time.perf_counter() - t0, loss0

    def time(self, warmup: int, steps: int) -> list[float]:
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            self._run()
            times.append(time.perf_counter() - t0)
        return times[warmup:]


# ---------------------------------------------------------------------------------------------
# the reference's side


def save_worker_inputs(ours: Ours, tmp: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in ours.inputs.items()}, str(tmp / "inputs.st"))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in ours.torch_weights.items()}, str(tmp / "weights.st"))


def time_reference(case: dict, args, tmp: Path) -> dict:
    """One worker run on the files ``save_worker_inputs`` wrote: ``{times_s, loss0, ...}``."""
    spec = {"mode": "bench", "kind": case["kind"], "config": case["config"],
            "ref_src": args.ref_src, "threads": args.threads, "warmup": args.warmup,
            "steps": args.steps, "grad_ckpt": args.ref_grad_ckpt,
            "inputs": str(tmp / "inputs.st"), "weights": str(tmp / "weights.st")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    out = tmp / "out.json"
    proc = subprocess.run([args.torch_python, str(WORKER), str(tmp / "spec.json"), str(out)],
                          check=False, capture_output=True, text=True,
                          timeout=args.worker_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker failed ({args.torch_python} {WORKER}), rc "
                           f"{proc.returncode}:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_case(name: str, args, tmp: Path) -> dict:
    """Compile ours, then ``--rounds`` alternations of (our steps, a reference worker run), so
    slow drifts of a shared machine hit both sides alike; medians/mins over the pooled steps."""
    case = CASES[name]
    ours = Ours(case)
    first_s, loss0 = ours.compile()
    save_worker_inputs(ours, tmp)
    t_ours, t_ref, ref = [], [], {}
    for _ in range(args.rounds):
        t_ours += ours.time(args.warmup, args.steps)
        ref = time_reference(case, args, tmp)
        t_ref += ref["times_s"]
    if ref["n_params"] != ours.n_params:
        raise RuntimeError(f"case {name}: the reference model has {ref['n_params']} parameters, "
                           f"ours {ours.n_params}: not the same model")
    med_o, med_r = float(np.median(t_ours)), float(np.median(t_ref))
    min_o, min_r = float(np.min(t_ours)), float(np.min(t_ref))
    return {"case": name, "size": size_label(case), "kind": case["kind"],
            "config": case["config"], "batch": case["batch"],
            "ours_ms": round(1e3 * med_o, 2), "ref_ms": round(1e3 * med_r, 2),
            "ratio_ref_over_ours": round(med_r / med_o, 3),
            "ours_min_ms": round(1e3 * min_o, 2), "ref_min_ms": round(1e3 * min_r, 2),
            "ratio_min": round(min_r / min_o, 3),
            "ours_compile_s": round(max(0.0, first_s - med_o), 2),
            "ours_loss0": loss0, "ref_loss0": ref["loss0"],
            "params": ours.n_params, "ref_params": ref["n_params"],
            "torch": ref["torch"], "ref_threads": ref["threads"]}


# ---------------------------------------------------------------------------------------------
# training dynamics (opt-in): the demo's VAE warm-up on both sides


REF_LOSS_KEYS = ("kl_beta", "kl_warmup_steps", "mse_weight", "adaptive_weights")


def run_dynamics(args, tmp: Path) -> dict:
    """Train the demo config's VAE (stage ``vae_warmup``: AdamW, clipping, recon + KL with
    adaptive weights and the colour/contrast/histogram regularisers) for ``--dynamics`` steps on
    both sides from the same initial weights, on the same shapes batches in the same order;
    ours with the training engine's own optimizer factory and VAE step, the reference with its
    own ``VAETrainer.train_step``. ``--dynamics_loss`` (JSON) overrides loss keys on both sides.
    Returns the reconstruction-loss curves (``vae_loss`` in the metrics files)."""
    import jax
    from safetensors.numpy import save_file

    from fluxflow_jax import sharding, train
    from fluxflow_jax import state as state_lib
    from fluxflow_jax import steps as steps_lib
    from fluxflow_jax.data import shapes
    from fluxflow_jax.data.transforms import to_float
    from fluxflow_jax.interop import vae as ivae
    from fluxflow_jax.models import registry

    n_steps, seed = int(args.dynamics), int(args.dynamics_seed)
    overrides = json.loads(args.dynamics_loss)
    if bad := sorted(set(overrides) - set(REF_LOSS_KEYS)):
        raise SystemExit(f"--dynamics_loss: keys {bad} cannot be set on the reference side; "
                         f"use {REF_LOSS_KEYS}")
    spec_ = importlib.util.spec_from_file_location("demo_config", HERE.parent / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(demo)
    cfg = demo.get_config("")
    st = cfg.stages.vae_warmup
    size, batch, n_img = int(cfg.datasets.shapes.img_size), int(cfg.batch_size), 512
    models = registry.build_models(cfg.model.to_dict(), {"compressor", "expander"})
    params, _ = registry.init_params(models, jax.random.key(seed), (size, size))
    images = to_float(np.stack([shapes.sample(i, 0, size)[0] for i in range(n_img)]))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(n_img)
                            for _ in range(n_steps * batch // n_img + 1)])[: n_steps * batch]
    opt = st.optimizers.vae
    loss = dict(st.loss.to_dict())
    loss.update(overrides)

    # The reference's copy of the initial weights, written before our step donates them.
    tw = {**ivae.compressor_to_torch({"params": params["compressor"]}, prefix="compressor."),
          **ivae.expander_to_torch({"params": params["expander"]}, prefix="expander.")}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tw.items()},
              str(tmp / "weights.st"))
    txs = train.make_txs(st, params, n_steps, "vae_warmup")
    state = state_lib.create_train_state(params, txs)
    loss_cfg = dict(loss, train_reconstruction=True, use_gan=False, use_spade=False,
                    use_lpips=False, ema_decay=0.0, train_text_encoder=False)
    mesh = sharding.make_mesh()
    sh = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, sh)
    step = steps_lib.make_vae_step(models, txs["vae"], loss_cfg, mesh, sh, advance_step=True)
    ours = []
    for i in range(n_steps):
        b = sharding.put_batch({"image": images[order[i * batch:(i + 1) * batch]]}, mesh)
        state, m = step(state, b, jax.random.key(seed + 1))
        ours.append({k: float(m[f"train/{k}"]) for k in ("loss_recon", "kl", "weight_kl")})

    save_file({"images": np.ascontiguousarray(images)}, str(tmp / "images.st"))
    spec = {"mode": "train_vae", "ref_src": args.ref_src, "threads": args.threads, "seed": seed,
            "config": {"vae_dim": cfg.model.vae_dim, "downscales": cfg.model.downscales,
                       "attn_layers": cfg.model.vae_attn_layers,
                       "attn_heads": cfg.model.vae_attn_heads},
            "weights": str(tmp / "weights.st"), "inputs": str(tmp / "images.st"),
            "order": order.tolist(), "batch": batch,
            "optimizer": {"lr": float(opt.lr), "betas": list(opt.betas),
                          "weight_decay": float(opt.weight_decay),
                          "clip_norm": float(opt.clip_norm)},
            "loss": {k: loss[k] for k in REF_LOSS_KEYS}}
    if opt.type != "AdamW":
        raise SystemExit(f"--dynamics expects the demo's AdamW, got {opt.type}")
    (tmp / "dyn.json").write_text(json.dumps(spec))
    proc = subprocess.run([args.torch_python, str(WORKER), str(tmp / "dyn.json"),
                           str(tmp / "dyn_out.json")], check=False, capture_output=True,
                          text=True, timeout=args.worker_timeout * 4)
    if proc.returncode != 0:
        raise RuntimeError(f"torch worker (train_vae) failed, rc {proc.returncode}:\n"
                           f"{proc.stderr[-4000:]}")
    ref = json.loads((tmp / "dyn_out.json").read_text())["metrics"]
    ref = [{"loss_recon": r["recon"], "kl": r["kl"], "weight_kl": r["weight_kl"]} for r in ref]
    return {"steps": n_steps, "seed": seed, "loss_overrides": overrides,
            "ours": {k: [r[k] for r in ours] for k in ours[0]},
            "ref": {k: [r[k] for r in ref] for k in ref[0]}}


def print_dynamics(d: dict, window: int = 25) -> None:
    n = d["steps"]
    print(f"\ndynamics: demo vae_warmup, {n} steps, seed {d['seed']}, loss overrides "
          f"{d['loss_overrides']}; mean vae_loss (recon) per {window} steps")
    for side in ("ours", "ref"):
        r = np.asarray(d[side]["loss_recon"])
        print(f"  {side:4s} " + " ".join(f"{r[i:i + window].mean():.3f}"
                                         for i in range(0, n, window)))
    for side in ("ours", "ref"):
        kl, w = d[side]["kl"], d[side]["weight_kl"]
        print(f"  {side:4s} kl first/last {kl[0]:.2e}/{kl[-1]:.2e}  weight_kl first/last "
              f"{w[0]:.1f}/{w[-1]:.1f}")


def check_setup(args) -> None:
    if not Path(args.torch_python).exists():
        raise SystemExit(f"--torch_python {args.torch_python} does not exist: make a venv with "
                         "torch, numpy, safetensors and einops (see this file's docstring)")
    vae = Path(args.ref_src) / "core" / "src" / "fluxflow" / "models" / "vae.py"
    if not vae.is_file():
        raise SystemExit(f"--ref_src {args.ref_src}: {vae} not found; export the reference with "
                         "git archive into <ref_src>/core and <ref_src>/training")


def pin_threads(n: int) -> list[int]:
    """Pin this process (and the worker it starts) to ``n`` cores before jax starts: XLA:CPU
    sizes its thread pool by the cores the process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    if n > len(cpus):
        raise SystemExit(f"--threads {n} but only {len(cpus)} cores are available")
    os.sched_setaffinity(0, cpus[:n])
    return cpus[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="vae16,vae32,flow,disc",
                    help=f"comma list of {','.join(CASES)}")
    ap.add_argument("--ref_src", default="/tmp/refsrc",
                    help="exported reference sources (<dir>/core/src, <dir>/training/src)")
    ap.add_argument("--torch_python", default="/tmp/refvenv/bin/python",
                    help="python of an environment with torch, numpy, safetensors, einops")
    ap.add_argument("--threads", type=int, default=2, help="cores for both sides")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternations of our steps and a reference run per case")
    ap.add_argument("--ref_grad_ckpt", action="store_true",
                    help="the reference VAE with gradient checkpointing (its default)")
    ap.add_argument("--worker_timeout", type=int, default=900)
    ap.add_argument("--dynamics", type=int, default=0,
                    help="also train the demo VAE warm-up this many steps on both sides "
                         "(0 = off; the reference takes ~1-2 s per step here)")
    ap.add_argument("--dynamics_seed", type=int, default=0)
    ap.add_argument("--dynamics_loss", default="{}",
                    help=f"JSON loss overrides for --dynamics, keys from {REF_LOSS_KEYS}")
    ap.add_argument("--out", default=str(HERE / "results" / "vs_reference.json"))
    args = ap.parse_args(argv)
    names = [s for s in args.cases.split(",") if s]
    if bad := [s for s in names if s not in CASES]:
        ap.error(f"unknown case(s) {bad}; choose from {list(CASES)}")
    check_setup(args)
    cores = pin_threads(args.threads)

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, cores {cores}", flush=True)
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_reference_") as d:
        for name in names:
            row = run_case(name, args, Path(d))
            rows.append(row)
            print(f"  {name:6s} ours {row['ours_ms']:9.2f} ms  ref {row['ref_ms']:9.2f} ms  "
                  f"ref/ours {row['ratio_ref_over_ours']:5.2f} (min {row['ratio_min']:5.2f})  "
                  f"compile {row['ours_compile_s']:5.1f} s  loss0 {row['ours_loss0']:.5f} / "
                  f"{row['ref_loss0']:.5f}", flush=True)
        dynamics = run_dynamics(args, Path(d)) if args.dynamics > 0 else None
    hdr = (f"{'size':40s} {'ours ms':>8s} {'ref ms':>8s} {'ref/ours':>8s} {'(min)':>6s} "
           f"{'compile s':>9s} {'params':>9s}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['size']:40s} {r['ours_ms']:8.1f} {r['ref_ms']:8.1f} "
              f"{r['ratio_ref_over_ours']:8.2f} {r['ratio_min']:6.2f} {r['ours_compile_s']:9.1f} "
              f"{r['params']:9d}")
    if dynamics:
        print_dynamics(dynamics)
    total = time.perf_counter() - t_all
    print(f"total {total:.0f} s")
    meta = {"jax": jax.__version__, "torch": rows[0]["torch"] if rows else None,
            "threads": args.threads,
            "cores": cores, "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor(), "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
            "ref_grad_ckpt": args.ref_grad_ckpt, "argv": sys.argv[1:],
            "timing": "median wall time of a full train step (fwd+loss+bwd+Adam), fp32",
            "total_s": round(total, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": rows}
    if dynamics:
        doc["dynamics"] = dynamics
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
