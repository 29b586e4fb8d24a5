"""Opt-in training dynamics of ``benchmarks/vs_reference.py`` (``--dynamics N``): the demo
config's VAE warm-up trained on both sides from the same weights on the same batches."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_torch_worker.py"

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


