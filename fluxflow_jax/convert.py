"""Convert checkpoints between the PyTorch reference layout and fluxflow_jax param files.

  python -m fluxflow_jax.convert to-flax  SRC OUT.safetensors [--config configs/phase1.py[:arg]]
  python -m fluxflow_jax.convert to-torch SRC.safetensors OUT_DIR
  python -m fluxflow_jax.convert count    SRC [--config ...]   # parameter counts per model
  python -m fluxflow_jax.convert lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips.safetensors

``SRC`` of ``to-flax`` is a reference file or directory. Head counts (compressor attention, flow,
text encoder) leave no trace in the weights: they are read from the file's metadata (files
exported by fluxflow_jax carry their model configs) or from ``--config``'s ``model`` section
(``vae_attn_heads``, ``flow_heads``, ``text.n_heads``), and the conversion is refused when
neither gives them. The flow model's and expander's ``ctx_tokens`` follow the compressor's
``downscales``, as in the reference's pipeline.

``lpips``: see ``fluxflow_jax.interop.lpips`` for the two input files and their formats.

Missing/unexpected keys and shape mismatches are listed in full (``InteropError``); user errors
exit with code 2 and one message.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from fluxflow_jax import config_defaults as cd
from fluxflow_jax import interop
from fluxflow_jax.interop import lpips as lpips_interop


def param_table(models: dict) -> str:
    """A small table of parameter counts (``params`` collection) per model."""
    rows = [(name, interop.count_params(v)) for name, (v, _) in models.items()]
    width = max([len(n) for n, _ in rows] + [5])
    lines = [f"{'model':<{width}}  {'params':>14}"]
    lines += [f"{n:<{width}}  {c:>14,}" for n, c in rows]
    lines.append(f"{'total':<{width}}  {sum(c for _, c in rows):>14,}")
    return "\n".join(lines)


def load_model_section(spec: str) -> Any:
    """``config.model`` of a config file given as ``path.py[:arg]`` (``get_config(arg)``).

    The same file a training run is launched with, so the conversion and the run agree on the
    settings a checkpoint does not record.
    """
    config = cd.load_config_file(spec)
    if "model" not in config:
        raise KeyError(f"--config {spec}: the config has no 'model' section")
    return config["model"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fluxflow_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    cfg_help = ("config file (configs/x.py[:arg]) whose model section gives the head counts "
                "the weights cannot show")
    a = sub.add_parser("to-flax", help="reference checkpoint -> fluxflow_jax param file")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--models", default=None, help="comma-separated subset, e.g. compressor,expander")
    a.add_argument("--config", default=None, help=cfg_help)
    b = sub.add_parser("to-torch", help="fluxflow_jax param file -> reference safetensors files")
    b.add_argument("src")
    b.add_argument("out_dir")
    c = sub.add_parser("count", help="parameter counts of a checkpoint or param file")
    c.add_argument("src")
    c.add_argument("--config", default=None, help=cfg_help)
    d = sub.add_parser("lpips", help="torchvision VGG16 + lpips heads -> loss.lpips_weights file")
    d.add_argument("--vgg", required=True, help="torchvision vgg16-397923af.pth (or .safetensors)")
    d.add_argument("--lin", required=True, help="lpips' weights/v0.1/vgg.pth (or .safetensors)")
    d.add_argument("--out", required=True, help="output .safetensors (set loss.lpips_weights to it)")
    args = p.parse_args(argv)
    try:
        model_cfg = load_model_section(args.config) if getattr(args, "config", None) else None
        if args.cmd == "to-flax":
            models = set(args.models.split(",")) if args.models else None
            loaded = interop.load_reference(args.src, models, model_cfg=model_cfg)
            out = interop.save_flax_params(args.out, loaded)
            print(param_table(loaded))
            print(f"wrote {out}")
        elif args.cmd == "to-torch":
            loaded = interop.load_flax_params(args.src)
            for f in interop.export_reference(args.out_dir, loaded):
                print(f"wrote {f}")
        elif args.cmd == "lpips":
            out = lpips_interop.convert_lpips(args.vgg, args.lin, args.out)
            print(f"wrote {out} (set loss.lpips_weights={out})")
        else:
            print(param_table(interop.load_any(args.src, model_cfg=model_cfg)))
    except (interop.InteropError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: Exception) -> str:
    """KeyError's str() adds quotes; multi-line InteropErrors (key lists) are kept whole."""
    return e.args[0] if isinstance(e, KeyError) and e.args else str(e)


if __name__ == "__main__":
    sys.exit(main())
