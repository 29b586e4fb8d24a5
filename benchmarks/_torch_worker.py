"""PyTorch side of ``benchmarks/vs_reference.py``: runs in a separate torch environment.

    <torch python> benchmarks/_torch_worker.py SPEC.json OUT.json

Nothing here is reference code: the reference's model (and, for ``train_vae``, trainer) modules
are imported from ``spec['ref_src']`` (a directory holding ``core/src`` and ``training/src`` of
the exported fluxflow-core / fluxflow-training repositories). Their package ``__init__`` files
pull in diffusers/transformers/lpips, which the models do not need, so the packages are
registered as bare namespaces and only the model/trainer files are executed.

Modes (``spec['mode']``):

* ``bench``: build the reference models of one case kind (``benchmarks/_cases.py``), load the
  weights ``vs_reference.py`` exported from fluxflow_jax (strict key check: same architecture,
  same numbers), and time ``warmup + steps`` iterations (per part: zero_grad, forward, loss,
  backward, Adam step) on NCHW contiguous inputs; ``dtype='bfloat16'`` runs forward + loss
  under autocast; ``device`` (``'cpu'``, ``'cuda'``) is where it runs, with ``tf32`` for fp32
  on a GPU; ``ref_variant='fixed'`` applies :func:`layout_fix` (``'shipped'``: the
  reference as it is). Writes ``{"times_s": [...], "loss0", "n_params", "peak_rss"}``.
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

from _measure import peak_rss, reset_peak_rss  # this file's folder is sys.path[0]


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


def layout_fix(modules: dict) -> int:
    """The one-line fix of the reference's cliff: its expander feeds ``ConvTranspose2d`` a
    channels-last view (``rearrange(... 'b (h w) d -> b d h w')``, kept by SPADE's elementwise
    ops), which sends oneDNN down a very slow path; ``.contiguous()`` on that input restores
    NCHW. Applied as a forward pre-hook on every ``ConvTranspose2d``; returns how many."""
    n = 0
    for m in modules.values():
        for sub in m.modules():
            if isinstance(sub, torch.nn.ConvTranspose2d):
                sub.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),) + args[1:])
                n += 1
    return n


def _hinge(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1).mean(1)


def build(spec: dict) -> tuple[dict, list]:
    """``(modules, parts)``: one ``(trained modules, loss_fn)`` per optimizer step of an
    iteration (``vs_reference`` / ``_cases`` describe each kind); ``loss_fn()`` runs forward +
    loss."""
    kind, cfg, ckpt = spec["kind"], spec["config"], bool(spec.get("grad_ckpt", False))
    dev = torch.device(spec.get("device", "cpu"))
    inputs = load_file(spec["inputs"])
    weights = spec["weights"]
    m: dict = {}
    if kind in ("vae", "vae_gan"):
        from fluxflow.models.vae import FluxCompressor, FluxExpander
        m["compressor"] = FluxCompressor(
            in_channels=3, d_model=cfg["vae_dim"], downscales=cfg["downscales"], max_hw=1024,
            attn_layers=cfg["attn_layers"], attn_heads=cfg["attn_heads"],
            use_gradient_checkpointing=ckpt)
        m["expander"] = FluxExpander(d_model=cfg["vae_dim"], upscales=cfg["downscales"],
                                     max_hw=1024, ctx_tokens=4, use_gradient_checkpointing=ckpt)
    if kind in ("disc", "vae_gan"):
        from fluxflow.models.discriminators import PatchDiscriminator
        m["discriminator"] = PatchDiscriminator(
            in_channels=3, base_ch=cfg["base_ch"], depth=cfg["depth"],
            ctx_dim=cfg.get("ctx_dim", cfg.get("vae_dim")))
    if kind in ("flow", "flow_iter"):
        from fluxflow.models.flow import FluxFlowProcessor
        m["flow"] = FluxFlowProcessor(d_model=cfg["flow_dim"], vae_dim=cfg["vae_dim"],
                                      embedding_size=cfg["embedding"], n_head=cfg["heads"],
                                      n_layers=cfg["layers"], max_hw=1024, ctx_tokens=4)
    if kind in ("text", "flow_iter"):
        from fluxflow.models.encoders import BertTextEncoder
        m["text"] = BertTextEncoder(embed_dim=cfg["embedding"])
    for name, mod in m.items():
        load_weights(mod, weights, f"{name}.")
        mod.to(dev)
    if spec.get("ref_variant", "shipped") == "fixed":
        layout_fix(m)
    t = {k: torch.from_numpy(v).to(dev) for k, v in inputs.items()}
    img = nchw(inputs["image"]).to(dev) if "image" in inputs else None

    def vae_out():
        packed, _, _ = m["compressor"](img, training=True)
        return packed, m["expander"](packed, use_context=True)

    def flow_loss(emb):
        x1, tt = t["packed"][:, :-1], t["t"][:, None, None]
        xt = torch.cat([tt * x1 + (1 - tt) * t["noise"], t["packed"][:, -1:]], dim=1)
        return F.mse_loss(m["flow"](xt, emb, t["t"])[:, :-1].float(), x1 - t["noise"])

    if kind == "vae":
        return m, [(("compressor", "expander"), lambda: F.l1_loss(vae_out()[1].float(), img))]
    if kind == "flow":
        return m, [(("flow",), lambda: flow_loss(t["text_emb"]))]
    if kind == "text":
        return m, [(("text",), lambda: F.mse_loss(
            m["text"](t["input_ids"].long(), t["attention_mask"].long()).float(), t["target"]))]
    if kind == "flow_iter":
        def flow_iter():
            with torch.no_grad():
                emb = m["text"](t["input_ids"].long(), t["attention_mask"].long())
            return flow_loss(emb)
        return m, [(("flow",), flow_iter)]
    d = m.get("discriminator")
    if kind == "disc":
        real, fake, ctx = nchw(inputs["real"]).to(dev), nchw(inputs["fake"]).to(dev), t["ctx"]

        def disc_loss():
            return (F.relu(1.0 - _hinge(d(real, ctx))).mean()
                    + F.relu(1.0 + _hinge(d(fake, ctx))).mean())
        return m, [(("discriminator",), disc_loss)]
    if kind == "vae_gan":
        def d_step():
            with torch.no_grad():
                packed, fake = vae_out()
                ctx = packed[:, :-1].mean(1)
            return (F.relu(1.0 - _hinge(d(img, ctx))).mean()
                    + F.relu(1.0 + _hinge(d(fake, ctx))).mean())

        def g_step():
            packed, rec = vae_out()
            ctx = packed[:, :-1].mean(1).detach()
            return F.l1_loss(rec.float(), img) - 0.1 * _hinge(d(rec, ctx)).mean()
        return m, [(("discriminator",), d_step), (("compressor", "expander"), g_step)]
    raise ValueError(f"spec.kind must be vae, flow, disc, text, vae_gan or flow_iter, got {kind!r}")


def bench(spec: dict, out_path: Path) -> dict:
    """Time ``warmup + steps`` iterations (every part: zero_grad, forward + loss under autocast
    when ``dtype`` is bfloat16, backward, Adam); after each iteration the times so far go to
    ``OUT.partial`` so a capped run still shows how far it got."""
    modules, parts = build(spec)
    for mod in modules.values():
        mod.train()
    if "text" in modules:  # frozen in flow_iter; dropout off on both sides in text (_cases)
        modules["text"].eval()
    opts, trained = [], []
    for names, _ in parts:
        ps = [p for n in names for p in modules[n].parameters()]
        trained.append(ps)
        opts.append(torch.optim.Adam(ps, lr=float(spec.get("lr", 1e-4))))
    all_trained = {id(p) for ps in trained for p in ps}
    n_params = int(sum(p.numel() for mod in modules.values() for p in mod.parameters()
                       if id(p) in all_trained))
    bf16 = spec.get("dtype", "float32") == "bfloat16"
    dev = torch.device(spec.get("device", "cpu"))
    cuda = dev.type == "cuda"
    every = [p for mod in modules.values() for p in mod.parameters()]
    times, cpu, losses = [], [], []
    peak_all, steps_only = 0, False
    partial = Path(str(out_path) + ".partial")
    for _ in range(int(spec["warmup"]) + int(spec["steps"])):
        t0, c0 = time.perf_counter(), time.process_time()
        for (names, loss_fn), opt, ps in zip(parts, opts, trained):
            mine = {id(p) for p in ps}
            for p in every:  # only this part's modules get gradients
                p.requires_grad_(id(p) in mine)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn()
            loss.backward()
            opt.step()
            losses.append(float(loss.item()))
        if cuda:  # the backward and Adam's kernels may still be queued
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        partial.write_text(json.dumps({"times_s": times, "peak_rss": max(peak_all, peak_rss())}))
        if len(times) == int(spec["warmup"]):  # Adam's state exists from here on
            peak_all, steps_only = peak_rss(), reset_peak_rss()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
    # loss0: the last part's loss of the first iteration (what our side reports too).
    return {"times_s": times[int(spec["warmup"]):], "cpu_s": cpu[int(spec["warmup"]):],
            "loss0": losses[len(parts) - 1],
            "losses": losses,
            "n_params": n_params, "peak_rss": max(peak_all, peak_rss()),
            "peak_rss_steps": peak_rss() if steps_only else None,
            # the GPU's allocated bytes at their peak over the timed iterations
            "peak_device_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else None}


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
    # fp32 on a GPU: TF32 matmuls and convolutions, as XLA's default precision runs ours
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(
        spec.get("tf32", False))
    torch.manual_seed(int(spec.get("seed", 0)))
    install_reference(spec["ref_src"])
    if spec.get("mode") == "bench":
        out = bench(spec, Path(argv[1]))
    elif spec.get("mode") == "train_vae":
        out = train_vae(spec)
    else:
        raise ValueError(f"spec.mode must be bench or train_vae, got {spec.get('mode')!r}")
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
