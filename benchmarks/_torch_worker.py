"""PyTorch side of ``benchmarks/vs_reference.py``: runs in a separate torch environment.

    <torch python> benchmarks/_torch_worker.py SPEC.json OUT.json

Nothing here is reference code: the reference's model (and, for ``train_vae``, trainer) modules
are imported from ``spec['ref_src']`` (a directory holding ``core/src`` and ``training/src`` of
the exported fluxflow-core / fluxflow-training repositories). Their package ``__init__`` files
pull in diffusers/transformers/lpips, which the models do not need, so the packages are
registered as bare namespaces and only the model/trainer files are executed.

Modes (``spec['mode']``):

* ``bench``: build one reference model group, load the weights ``vs_reference.py`` exported from
  fluxflow_jax (``load_state_dict(strict=True)``: same architecture, same numbers), and time
  ``warmup + steps`` fp32 training steps (zero_grad, forward, loss, backward, Adam step) on NCHW
  contiguous inputs. Writes ``{"times_s": [...], "loss0": ..., "n_params": ...}``.
* ``train_vae``: the reference's own ``VAETrainer.train_step`` (reconstruction + KL with adaptive
  weights and the colour/histogram/contrast regularisers, no GAN, no LPIPS, grad clipping) on a
  fixed sequence of image batches; writes the per-step metrics it returns.
"""
from __future__ import annotations

import json
import logging
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file


def _bare_package(name: str, path: Path) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod
    return mod


def install_reference(ref_src: str) -> None:
    """Make ``fluxflow.models.*`` and ``fluxflow_training.training.*`` importable without
    running their package ``__init__`` files (which import diffusers and friends)."""
    root = Path(ref_src)
    core, training = root / "core" / "src", root / "training" / "src"
    for p in (core / "fluxflow" / "models" / "vae.py",
              training / "fluxflow_training" / "training" / "vae_trainer.py"):
        if not p.is_file():
            raise FileNotFoundError(f"--ref_src {ref_src}: {p} not found (export the reference "
                                    "repositories with git archive into core/ and training/)")
    _bare_package("fluxflow", core / "fluxflow")
    _bare_package("fluxflow.models", core / "fluxflow" / "models")
    utils = _bare_package("fluxflow.utils", core / "fluxflow" / "utils")
    import importlib
    utils.get_logger = importlib.import_module("fluxflow.utils.logger").get_logger
    _bare_package("fluxflow_training", training / "fluxflow_training")
    _bare_package("fluxflow_training.training", training / "fluxflow_training" / "training")


def nchw(a: np.ndarray) -> torch.Tensor:
    """NHWC numpy -> NCHW *contiguous* torch (the layout the reference's data loader gives;
    channels-last inputs send its ConvTranspose2d down a very slow path)."""
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def load_weights(module: torch.nn.Module, path: str, prefix: str) -> None:
    sd = {k[len(prefix):]: torch.from_numpy(np.ascontiguousarray(v))
          for k, v in load_file(path).items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    # Any key mismatch means the two sides do not build the same model: stop, naming the keys.
    if missing or unexpected:
        raise RuntimeError(f"{type(module).__name__} weights from {path} [{prefix}*]: missing "
                           f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                           f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")


def build(spec: dict) -> tuple[dict, callable]:
    """``(modules, loss_fn)`` for ``spec['kind']``; ``loss_fn()`` runs one forward + loss."""
    kind, cfg, ckpt = spec["kind"], spec["config"], bool(spec.get("grad_ckpt", False))
    inputs = load_file(spec["inputs"])
    weights = spec["weights"]
    if kind == "vae":
        from fluxflow.models.vae import FluxCompressor, FluxExpander
        comp = FluxCompressor(in_channels=3, d_model=cfg["vae_dim"], downscales=cfg["downscales"],
                              max_hw=1024, attn_layers=cfg["attn_layers"],
                              attn_heads=cfg["attn_heads"], use_gradient_checkpointing=ckpt)
        expd = FluxExpander(d_model=cfg["vae_dim"], upscales=cfg["downscales"], max_hw=1024,
                            ctx_tokens=4, use_gradient_checkpointing=ckpt)
        load_weights(comp, weights, "compressor.")
        load_weights(expd, weights, "expander.")
        img = nchw(inputs["image"])

        def loss_fn():
            packed, _, _ = comp(img, training=True)
            return F.l1_loss(expd(packed, use_context=True), img)
        return {"compressor": comp, "expander": expd}, loss_fn
    if kind == "flow":
        from fluxflow.models.flow import FluxFlowProcessor
        flow = FluxFlowProcessor(d_model=cfg["flow_dim"], vae_dim=cfg["vae_dim"],
                                 embedding_size=cfg["embedding"], n_head=cfg["heads"],
                                 n_layers=cfg["layers"], max_hw=1024, ctx_tokens=4)
        load_weights(flow, weights, "flow.")
        packed = torch.from_numpy(inputs["packed"])
        emb = torch.from_numpy(inputs["text_emb"])
        t = torch.from_numpy(inputs["t"])
        target = torch.from_numpy(inputs["target"])

        def loss_fn():
            return F.mse_loss(flow(packed, emb, t)[:, :-1], target)
        return {"flow": flow}, loss_fn
    if kind == "disc":
        from fluxflow.models.discriminators import PatchDiscriminator
        disc = PatchDiscriminator(in_channels=3, base_ch=cfg["base_ch"], depth=cfg["depth"],
                                  ctx_dim=cfg["ctx_dim"])
        load_weights(disc, weights, "discriminator.")
        real, fake = nchw(inputs["real"]), nchw(inputs["fake"])
        ctx = torch.from_numpy(inputs["ctx"])

        def loss_fn():
            r = disc(real, ctx).flatten(1).mean(1)
            f = disc(fake, ctx).flatten(1).mean(1)
            return F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()
        return {"discriminator": disc}, loss_fn
    raise ValueError(f"spec.kind must be vae, flow or disc, got {kind!r}")


def bench(spec: dict) -> dict:
    modules, loss_fn = build(spec)
    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.train()
    opt = torch.optim.Adam(params, lr=float(spec.get("lr", 1e-4)))
    times, losses = [], []
    for _ in range(int(spec["warmup"]) + int(spec["steps"])):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
        times.append(time.perf_counter() - t0)
    return {"times_s": times[int(spec["warmup"]):], "loss0": losses[0], "losses": losses,
            "n_params": int(sum(p.numel() for p in params))}


class _Accelerator:
    """What ``VAETrainer`` asks of accelerate's Accelerator on one CPU process."""

    scaler = None

    @staticmethod
    def backward(loss):
        loss.backward()

    @staticmethod
    def clip_grad_norm_(params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def train_vae(spec: dict) -> dict:
    from fluxflow.models.vae import FluxCompressor, FluxExpander
    from fluxflow_training.training.vae_trainer import VAETrainer
    logging.getLogger("fluxflow_training").setLevel(logging.ERROR)
    cfg = spec["config"]
    comp = FluxCompressor(in_channels=3, d_model=cfg["vae_dim"], downscales=cfg["downscales"],
                          max_hw=1024, attn_layers=cfg["attn_layers"],
                          attn_heads=cfg["attn_heads"], use_gradient_checkpointing=False)
    expd = FluxExpander(d_model=cfg["vae_dim"], upscales=cfg["downscales"], max_hw=1024,
                        ctx_tokens=4, use_gradient_checkpointing=False)
    load_weights(comp, spec["weights"], "compressor.")
    load_weights(expd, spec["weights"], "expander.")
    o = spec["optimizer"]
    params = list(comp.parameters()) + list(expd.parameters())
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["betas"]),
                            weight_decay=o["weight_decay"], eps=o.get("eps", 1e-8))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    lc = spec["loss"]
    trainer = VAETrainer(
        compressor=comp, expander=expd, optimizer=opt, scheduler=sched, ema=None,
        reconstruction_loss_fn=torch.nn.L1Loss(), reconstruction_loss_min_fn=torch.nn.MSELoss(),
        use_spade=bool(lc.get("use_spade", False)), train_reconstruction=True,
        kl_beta=lc["kl_beta"], kl_warmup_steps=lc["kl_warmup_steps"], kl_free_bits=0.0,
        use_gan=False, gradient_clip_norm=o["clip_norm"], use_lpips=False,
        adaptive_weights=bool(lc.get("adaptive_weights", True)), mse_weight=lc["mse_weight"],
        accelerator=_Accelerator())
    images = load_file(spec["inputs"])["images"]  # [N, H, W, 3] in [-1, 1]
    order = np.asarray(spec["order"], np.int64).reshape(-1, int(spec["batch"]))
    rows = []
    for step, idx in enumerate(order):
        m = trainer.train_step(nchw(images[idx]), step + int(spec.get("step0", 0)))
        rows.append({k: float(v) for k, v in m.items() if isinstance(v, (int, float))})
    return {"metrics": rows}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    torch.set_num_threads(int(spec.get("threads", 2)))
    torch.manual_seed(int(spec.get("seed", 0)))
    install_reference(spec["ref_src"])
    modes = {"bench": bench, "train_vae": train_vae}
    if spec.get("mode") not in modes:
        raise ValueError(f"spec.mode must be one of {sorted(modes)}, got {spec.get('mode')!r}")
    out = modes[spec["mode"]](spec)
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
