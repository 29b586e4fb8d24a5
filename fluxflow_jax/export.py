"""Export a run's weights in the PyTorch reference layout, on demand.

  python -m fluxflow_jax.export --workdir runs/demo [--stage NAME]

Finished stages are exported from ``W/stages/<stage>/params.safetensors``; the stage in progress
from its latest Orbax checkpoint (rebuilt with the same ``train.build_stage`` the run used).
Output: ``W/export/<stage>/{flxflow_final,text_encoder,D_img}.safetensors`` (+ ``ema/``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import ml_collections as mlc
from absl import app, flags

from fluxflow_jax import checkpoint as ckpt_lib
from fluxflow_jax import interop, train, weights
from fluxflow_jax import workdir as wd
from fluxflow_jax.models import registry

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_string("stage", None, "Stage to export (default: every finished stage and the "
                    "stage in progress).")


def load_run_config(workdir: Path) -> mlc.ConfigDict:
    p = wd.config_path(workdir)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no run config (is {workdir} a fluxflow_jax workdir?)")
    return mlc.ConfigDict(json.loads(p.read_text()))


def export_in_progress(config: mlc.ConfigDict, workdir: Path, name: str) -> list[Path]:
    """Export the latest checkpoint of an unfinished stage."""
    st = train.build_stage(config, name, with_data=False)
    params, spectral = jax.eval_shape(
        lambda k: registry.init_params(st.models, k, image_hw=(32, 32),
                                       text_len=int(config.max_length)), jax.random.key(0))
    abstract = jax.eval_shape(lambda p, s: train.create_state(st, p, s)[0], params, spectral)
    shardings = train.state_shardings(st, abstract)
    ck = ckpt_lib.Checkpointer(wd.checkpoint_dir(workdir, name), async_save=False)
    restored = ck.restore(train.abstract_state(abstract, shardings))
    ck.close()
    if restored is None:
        raise FileNotFoundError(f"stage {name!r}: no checkpoint in {wd.checkpoint_dir(workdir, name)}")
    state = restored[0]
    prev = None
    order = list(config.stage_order)
    for n in reversed(order[:order.index(name)]):
        if wd.stage_params_path(workdir, n).exists():
            prev = wd.stage_params_path(workdir, n)
            break
    carried = {}
    if prev is not None:
        carried = {k: v for k, v in interop.load_flax_params(prev).items()
                   if k not in st.models.names()}
    return weights.export_stage(workdir, name, st.models, state, carried)


def export_run(workdir: str | Path, stage: str | None = None) -> list[Path]:
    workdir = Path(workdir)
    config = load_run_config(workdir)
    pstate = wd.read_pipeline_state(workdir)
    names = [stage] if stage else list(config.stage_order)
    written: list[Path] = []
    for name in names:
        if name not in config.stage_order:
            raise KeyError(f"--stage {name!r} is not a stage of this run {list(config.stage_order)}")
        params_file = wd.stage_params_path(workdir, name)
        if name in pstate["finished"] and params_file.exists():
            written += interop.export_reference(wd.export_dir(workdir, name),
                                                interop.load_flax_params(params_file))
        elif wd.checkpoint_dir(workdir, name).exists():
            written += export_in_progress(config, workdir, name)
    if not written:
        raise FileNotFoundError(f"{workdir}: nothing to export (no finished stage, no checkpoint)")
    return written


def main(argv) -> int:
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    try:
        for p in export_run(FLAGS.workdir, FLAGS.stage):
            print(f"wrote {p}")
    except (FileNotFoundError, KeyError, interop.InteropError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
