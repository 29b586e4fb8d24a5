"""The broken-input corpus (``broken_corpus.py``) through a real training stage, as the training
loop reads it: every bad sample skipped and counted under its reason in the metrics JSONL, 0
crashes, nothing opened outside the image folder (audit hook over the whole in-process run)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections as mlc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from broken_corpus import build_folder_corpus, watch_opens  # noqa: E402
from run_utils import load_config

from fluxflow_jax import config_defaults as cd  # noqa: E402
from fluxflow_jax import pipeline  # noqa: E402

pytestmark = pytest.mark.xdist_group("corpus")


def test_broken_corpus_through_a_training_stage(tmp_path):
    corpus = build_folder_corpus(tmp_path / "corpus")
    c = load_config()
    c.datasets.shapes = cd.dataset_config(**corpus.config)
    c.stage_order = ("vae_warmup",)
    n_good = len(corpus.good)
    c.batch_size = 2
    c.stages.vae_warmup.steps = 2 * (n_good // 2)  # two epochs: every entry is read twice
    c.stages.vae_warmup.stop_metric = ""
    c.log_interval = 1
    c.samples.enabled = False
    with watch_opens(corpus.outside) as opened:
        state = pipeline.run(mlc.ConfigDict(c), tmp_path / "w")
    assert state["finished"] == ["vae_warmup"]
    assert opened == []
    last = json.loads((tmp_path / "w" / "graph" / "training_metrics_vae_warmup.jsonl")
                      .read_text().splitlines()[-1])["extras"]
    counts = {k[len("data_skipped_"):]: v for k, v in last.items()
              if k.startswith("data_skipped_") and k != "data_skipped_total" and v}
    assert counts == corpus.skipped
    assert last["data_skipped_total"] == sum(corpus.skipped.values())
    assert len(corpus.skipped) >= 10  # many kinds of damage, each under its own reason
