"""Convert checkpoints between the PyTorch reference layout and fluxflow_jax param files.

  python -m fluxflow_jax.convert to-flax  SRC OUT.safetensors   # SRC: reference file or directory
  python -m fluxflow_jax.convert to-torch SRC.safetensors OUT_DIR
  python -m fluxflow_jax.convert count    SRC                   # parameter counts per model

Missing/unexpected keys and shape mismatches are listed in full (``InteropError``); exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from fluxflow_jax import interop


def param_table(models: dict) -> str:
    """A small table of parameter counts (``params`` collection) per model."""
    rows = [(name, interop.count_params(v)) for name, (v, _) in models.items()]
    width = max([len(n) for n, _ in rows] + [5])
    lines = [f"{'model':<{width}}  {'params':>14}"]
    lines += [f"{n:<{width}}  {c:>14,}" for n, c in rows]
    lines.append(f"{'total':<{width}}  {sum(c for _, c in rows):>14,}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fluxflow_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-flax", help="reference checkpoint -> fluxflow_jax param file")
    a.add_argument("src")
    a.add_argument("out")
    a.add_argument("--models", default=None, help="comma-separated subset, e.g. compressor,expander")
    b = sub.add_parser("to-torch", help="fluxflow_jax param file -> reference safetensors files")
    b.add_argument("src")
    b.add_argument("out_dir")
    c = sub.add_parser("count", help="parameter counts of a checkpoint or param file")
    c.add_argument("src")
    args = p.parse_args(argv)
    try:
        if args.cmd == "to-flax":
            models = set(args.models.split(",")) if args.models else None
            loaded = interop.load_reference(args.src, models)
            out = interop.save_flax_params(args.out, loaded)
            print(param_table(loaded))
            print(f"wrote {out}")
        elif args.cmd == "to-torch":
            loaded = interop.load_flax_params(args.src)
            for f in interop.export_reference(args.out_dir, loaded):
                print(f"wrote {f}")
        else:
            print(param_table(interop.load_any(args.src)))
    except (interop.InteropError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
