"""The broken corpus (``broken_corpus.py``) through ``make_loader`` for the folder, JSONL and
WebDataset sources (and the TFDS packer): every good and convertible sample is used, every bad one is skipped and
counted under its reason (once, however many epochs), nothing crashes, and nothing outside the
dataset folder is opened."""
from __future__ import annotations

import numpy as np
import pytest
from broken_corpus import build_folder_corpus, build_webdataset_corpus, watch_opens
from test_data_helpers import tok

from fluxflow_jax.data import make_loader, tokenize
from fluxflow_jax.data.tfds_pack import pack_folder


def _loader(cfg, **kw):
    return make_loader({**cfg, **kw}, global_batch_size=1, seed=0, tokenizer=tok(),
                       process_index=0, process_count=1)


def _identify(batch, corpus) -> str:
    """The caption of the good sample in a batch of 1 (its tokens and its pixels must agree)."""
    caps = list(corpus.good)
    ids = tokenize(tok(), caps, 16)[0]
    hits = [c for c, row in zip(caps, ids) if np.array_equal(row, batch["input_ids"][0])]
    assert len(hits) == 1, "a batch row that is not a good sample of the corpus"
    np.testing.assert_array_equal(batch["image"][0], corpus.good[hits[0]], err_msg=hits[0])
    return hits[0]


def _run(corpus, n_batches, **kw):
    with watch_opens(corpus.outside) as opened:
        L = _loader(corpus.config, **kw)
        seen = [_identify(next(L), corpus) for _ in range(n_batches)]
        stats = L.stats()
        L.close()
    return L, seen, stats, opened


def _check_counts(stats, corpus):
    got = {k[len("skipped_"):]: v for k, v in stats.items()
           if k.startswith("skipped_") and k != "skipped_total"}
    assert got == corpus.skipped
    assert stats["skipped_total"] == sum(corpus.skipped.values())


def test_corpus_has_at_least_20_kinds_of_broken_entry(tmp_path):
    kinds = {}
    for fmt in ("tsv", "jsonl"):
        kinds.update(build_folder_corpus(tmp_path / fmt, fmt).kinds)
    kinds.update(build_webdataset_corpus(tmp_path / "wds").kinds)
    broken = {k for k, r in kinds.items() if r != "good"}
    assert len(broken) >= 20, sorted(broken)
    assert {r for r in kinds.values()} >= {"outside_folder", "too_small", "too_large",
                                           "truncated_image", "corrupt_image", "shard_error",
                                           "malformed_caption", "bad_utf8", "missing_image"}


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
@pytest.mark.parametrize("workers", [0, 2])
def test_folder_corpus_uses_every_good_sample_and_counts_every_bad_one(tmp_path, fmt, workers):
    corpus = build_folder_corpus(tmp_path, fmt)
    L, seen, stats, opened = _run(corpus, 2 * 40, workers=workers)
    # with a batch of 1 an epoch visits every listed entry: all good samples are in it
    n = L.epoch_length
    assert set(seen[:n]) == set(corpus.good)
    _check_counts(stats, corpus)          # after two epochs: each bad sample counted once
    assert stats["epoch"] == 80 // n
    assert opened == []


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_folder_corpus_in_bucket_mode_finds_bad_headers_before_the_first_batch(tmp_path, fmt):
    corpus = build_folder_corpus(tmp_path, fmt)
    with watch_opens(corpus.outside) as opened:
        L = _loader(corpus.config, resize_mode="bucket", buckets=[[32, 32], [32, 48]],
                    workers=2)
        pre = L.stats()
        seen = {_identify(next(L), corpus) for _ in range(2 * L.epoch_length)}
        stats = L.stats()
        L.close()
    assert seen == set(corpus.good)
    for reason in ("outside_folder", "too_small", "too_large", "missing_file", "empty_file"):
        assert pre[f"skipped_{reason}"] == corpus.skipped[reason], reason
    _check_counts(stats, corpus)
    assert opened == []


@pytest.mark.parametrize("workers", [1, 3])
def test_webdataset_corpus_uses_every_good_sample_and_counts_every_bad_one(tmp_path, workers):
    corpus = build_webdataset_corpus(tmp_path)
    n = len(corpus.good)
    _, seen, stats, opened = _run(corpus, 3 * n, workers=workers)
    assert sorted(seen) == sorted(list(corpus.good) * 3)
    _check_counts(stats, corpus)          # three passes: still each bad sample once
    assert stats["epoch"] >= 2
    assert opened == []


def test_webdataset_corpus_with_a_shuffle_buffer_larger_than_the_data(tmp_path):
    corpus = build_webdataset_corpus(tmp_path)
    n = len(corpus.good)
    _, seen, stats, _ = _run(corpus, 2 * n, shuffle=True, shuffle_buffer=1000, workers=2)
    assert set(seen) == set(corpus.good)
    _check_counts(stats, corpus)
    assert stats["epoch"] <= 4


def test_audit_hook_sees_an_open_outside(tmp_path):
    """The open watch itself works (else the checks above could never fail)."""
    corpus = build_folder_corpus(tmp_path)
    with watch_opens(corpus.outside) as opened:
        (corpus.outside / "secret.png").read_bytes()
    assert opened == [str((corpus.outside / "secret.png").resolve())]


def test_folder_corpus_packed_to_tfds_then_loaded(tmp_path):
    """The TFDS packer refuses the same entries (nothing outside opened); images it cannot know
    are too small for a later config are packed and skipped by the loader."""
    corpus = build_folder_corpus(tmp_path / "c")
    cfg = corpus.config
    with watch_opens(corpus.outside) as opened:
        res = pack_folder(cfg["image_folder"], cfg["captions_file"], str(tmp_path / "tfds"),
                          "broken_corpus")
    assert opened == []
    packed_skips = {r: n for r, n in corpus.skipped.items() if r != "too_small"}
    assert res["skipped"] == packed_skips
    n_small = corpus.skipped["too_small"]
    assert res["num_examples"] == len(corpus.good) + n_small
    L = _loader({"type": "tfds", "tfds_name": "broken_corpus", "data_dir": str(tmp_path / "tfds"),
                 "img_size": 32, "resize_mode": "fixed", "max_length": 16, "shuffle": False})
    seen = {_identify(next(L), corpus) for _ in range(L.epoch_length)}
    assert seen == set(corpus.good)
    assert L.stats()["skipped_too_small"] == n_small and L.stats()["skipped_total"] == n_small
    L.close()
