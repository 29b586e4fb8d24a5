"""Step time of LoRA training with the DoP term due every step against DoP off, and the layout of
every convolution the DoP branch compiles.

    python benchmarks/lora_dop.py                       # D=64, 2 layers, batch 4, 8x8 and 16x16
    python benchmarks/lora_dop.py --dim 128 --grids 16 --steps 10

Why: the flow step computes the DoP term (``steps/flow.py``: the adapted and the base model on the
class prompt) inside a ``lax.cond``, so it costs nothing on the steps where it is not due. XLA:CPU
maps a convolution to a library kernel only in its canonical layout (``b01f_01io->b01f``) and
does not rewrite autodiff's layouts into it inside a conditional's branches, where it compiles
them as plain loops (benchmarks/README.md, "Convolutions inside lax.cond"). The flow's output
head has three convolutions (5x5, 3x3, 7x7), so the input gradients the DoP term takes through
them are such loops unless ``layers.Conv`` writes them canonically (``layers.conv_stride1``).

Each row is the flow step exactly as a LoRA stage builds it (``steps.make_flow_step`` with
``frozen=('flow', 'text_encoder')``, AdamW on rank-4 attention adapters, token ids in the batch
so the frozen text encoder runs in the step), ``lora.dop_every_n_steps = 1`` and
``dop_multiplier`` 1 (``dop``) or 0 (``off``). ``convs``: the compiled step's convolutions by
where they are (``cond``: inside the DoP branch) and ``dim_labels``; ``ms``: min and median wall
time of ``--steps`` calls after one warm-up. Prints a table; writes
``benchmarks/results/lora_dop.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fluxflow_jax import lora, optim, sharding, steps, xla
from fluxflow_jax.models import registry
from fluxflow_jax.state import create_train_state, step_params

VOCAB, L = 400, 8


def model_cfg(dim: int, layers: int, heads: int) -> dict:
    return {"vae_dim": 8, "downscales": 2, "upscales": 2, "vae_attn_layers": 1,
            "vae_attn_heads": 2, "flow_dim": dim, "flow_layers": layers, "flow_heads": heads,
            "text_embedding_dim": 16, "max_hw": 1024, "activation": "bezier", "remat": False,
            "dtype": "float32", "disc": {"base_ch": 4, "depth": 2},
            "text": {"vocab_size": VOCAB, "dim": 16, "n_layers": 1, "n_heads": 2,
                     "hidden_dim": 32, "max_position_embeddings": 16, "dropout": 0.0,
                     "pooling": "mean", "freeze_backbone": False}}


def conv_layouts(hlo_text: str) -> dict[str, int]:
    """``'<where> <dim_labels>' -> count`` over the convolutions of compiled HLO text."""
    where = lambda ln: "cond" if "cond/branch" in ln else "main"
    return dict(Counter(f"{where(ln)} {ln.split('dim_labels=')[1].split(',')[0]}"
                        for ln in hlo_text.splitlines() if " convolution(" in ln))


def measure(models, params, grid: int, batch: int, mult: float, n_steps: int) -> dict:
    """One row: the LoRA flow step with ``dop_multiplier = mult`` on a ``grid x grid`` latent."""
    sub = step_params("flow", params)
    labels = optim.param_labels(sub, {m: ("lora" if m == "flow_lora" else "frozen") for m in sub})
    tx = optim.make_partitioned({"frozen": None, "lora": optim.make_optimizer(
        {"type": "AdamW", "lr": 1e-3}, None, 100, name="optimizers.lora")}, labels)
    mesh = sharding.make_mesh()
    state = create_train_state(params, {"flow": tx}, adaptive_window=None)
    sh = sharding.tree_shardings(state, mesh)
    cfg = lora.settings({"rank": 4, "alpha": 4.0, "trigger": "sks", "class_word": "colored",
                         "dop_multiplier": mult, "dop_every_n_steps": 1})
    step = steps.make_flow_step(models, tx, {}, mesh, sh, frozen=("flow", "text_encoder"),
                                lora_cfg=cfg)
    r = np.random.default_rng(2)
    ids = r.integers(5, VOCAB, (batch, L)).astype(np.int32)
    hw = np.zeros((batch, 1, 8), np.float32)
    hw[:, 0, :2] = grid
    b = {"latent": np.concatenate([r.normal(size=(batch, grid * grid, 8)).astype(np.float32),
                                   hw], 1),
         "input_ids": ids, "attention_mask": np.ones((batch, L), np.int32),
         "dop_input_ids": np.where(ids == ids[0, 1], 7, ids),
         "dop_attention_mask": np.ones((batch, L), np.int32)}
    b = sharding.put_batch(b, mesh)
    state = jax.device_put(state, sh)
    layouts = conv_layouts(step.lower(state, b, jax.random.key(1)).compile().as_text())
    state, m = step(state, b, jax.random.key(1))
    jax.block_until_ready(state)
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        state, m = step(state, b, jax.random.key(1))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return {"grid": grid, "tokens": grid * grid, "dop": "dop" if mult else "off",
            "dop_ran": float(m["train/dop_ran"]) if "train/dop_ran" in m else 0.0,
            "convs": layouts, "min_ms": round(1e3 * min(times), 2),
            "median_ms": round(1e3 * float(np.median(times)), 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--grids", default="8,16", help="latent grid sides (tokens = side^2)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_dop.json"))
    args = ap.parse_args(argv)
    xla.enable_compilation_cache()
    models = registry.build_models(model_cfg(args.dim, args.layers, args.heads),
                                   {"flow", "text_encoder"})
    params, _ = registry.init_params(models, jax.random.key(0, impl="rbg"), (16, 16), L)
    # host copies: each row's step donates the state it is given
    params = jax.device_get({**params, "flow_lora": lora.init_adapters(
        params["flow"], 4, "attention", jax.random.key(5))})
    rows = [measure(models, params, g, args.batch, mult, args.steps)
            for g in (int(s) for s in args.grids.split(",")) for mult in (1.0, 0.0)]
    print(f"LoRA flow step, D={args.dim}, {args.layers} layers, batch {args.batch}, "
          f"{jax.devices()[0].platform}")
    print(f"{'tokens':>6} {'DoP':<4}{'min ms':>9}{'median ms':>11}  convolutions (where layout)")
    for r in rows:
        convs = ", ".join(f"{k}: {v}" for k, v in sorted(r["convs"].items()))
        print(f"{r['tokens']:>6} {r['dop']:<4}{r['min_ms']:>9.1f}{r['median_ms']:>11.1f}  {convs}")
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "device": jax.devices()[0].device_kind, "platform": platform.platform(),
              "jax": jax.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
