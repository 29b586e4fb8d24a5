"""A stage on a folder of two aspect buckets, through ``pipeline.run`` as the entry point calls
it: each batch shape compiles the steps once; the shape that first arrives mid-stage is announced
with its compile time (a pause of minutes at Phase 1 size would otherwise look like a hang), and
the metrics JSONL counts the shapes and the seconds spent compiling them."""
from __future__ import annotations

import json
import re

import ml_collections as mlc
from run_utils import load_config
from test_data_helpers import encode, shape_image

from fluxflow_jax import config_defaults as cd
from fluxflow_jax import pipeline
from fluxflow_jax.data import write_shapes_folder


def test_each_bucket_shape_compiles_once_and_a_new_one_is_announced(tmp_path, capsys):
    data = write_shapes_folder(tmp_path / "f", 8, img_size=32)
    for i in range(4, 8):  # half of the images wide: a second bucket
        (tmp_path / "f" / f"{i:06d}.png").write_bytes(encode(shape_image(i, (32, 48))))
    c = load_config()
    c.datasets.shapes = cd.dataset_config(**data, img_size=32, resize_mode="bucket",
                                          buckets=[[32, 32], [32, 48]])
    c.stage_order = ("vae_warmup",)
    c.batch_size = 2
    c.stages.vae_warmup.steps = 8  # two epochs of 2 square and 2 wide batches
    c.stages.vae_warmup.stop_metric = ""
    c.log_interval = 1
    c.samples.enabled = False
    state = pipeline.run(mlc.ConfigDict(c), tmp_path / "w")
    got = capsys.readouterr()
    out = got.out + got.err  # messages during the stage go with the progress line, to stderr
    assert state["finished"] == ["vae_warmup"]
    assert len(re.findall(r"\[vae_warmup\] compiled vae in [0-9.]+ s", out)) == 1, out
    new = re.findall(r"\[vae_warmup\] step (\d+): new batch shape image 2x32x(\d+)x3: compiled "
                     r"vae in ([0-9.]+) s \(shape 2, ([0-9]+) s compiling in this stage\)", out)
    assert len(new) == 1 and 2 <= int(new[0][0]) <= 8, out  # the other shape, once
    rows = [json.loads(ln) for ln in (tmp_path / "w" / "graph" /
                                      "training_metrics_vae_warmup.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    shapes = [r["extras"]["batch_shapes"] for r in rows]
    step = int(new[0][0])
    assert shapes == [1] * (step - 1) + [2] * (9 - step)
    spent = [r["extras"]["compile_s"] for r in rows]
    # the message rounds to 0.1 s, the JSONL to 0.01 s
    assert spent[0] > 0 and abs(spent[step - 1] - spent[0] - float(new[0][2])) <= 0.07
    assert spent[-1] == spent[step - 1]  # nothing compiled after both shapes were seen
