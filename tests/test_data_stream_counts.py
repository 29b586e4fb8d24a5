"""Streaming counters count distinct bad samples, not passes over them, and a shuffle buffer
larger than the data set is shrunk (with one warning) instead of reading dozens of passes before
the first batch."""
from __future__ import annotations

import logging

from test_data_helpers import check_resume, encode, shape_image, take, tok
from test_data_webdataset import write_tar

from fluxflow_jax.data import make_loader, shapes


def _tiny_stream(root):
    """4 samples in 2 shards: 2 usable, 1 corrupt image, 1 without caption."""
    good = [{"__key__": f"g{i}", "png": encode(shape_image(i)),
             "txt": shapes.scene(i).caption.encode()} for i in range(2)]
    write_tar(root / "a.tar", [good[0], {"__key__": "bad", "png": b"junk" * 9, "txt": b"x"}])
    write_tar(root / "b.tar", [{"__key__": "nocap", "png": encode(shape_image(5))}, good[1]])
    return {"type": "webdataset", "urls": [str(root / "a.tar"), str(root / "b.tar")],
            "img_size": 32, "resize_mode": "fixed", "max_length": 16, "workers": 2}


def _loader(cfg, seed=0):
    return make_loader(cfg, global_batch_size=2, seed=seed, tokenizer=tok(), process_index=0,
                       process_count=1)


def test_bad_stream_samples_are_counted_once_however_many_passes(tmp_path, caplog):
    cfg = _tiny_stream(tmp_path)           # default shuffle_buffer=256 over 2 usable samples
    L = _loader(cfg)
    with caplog.at_level(logging.WARNING, logger="fluxflow_jax.data"):
        take(L, 12)
    s = L.stats()
    assert (s["skipped_unreadable_image"], s["skipped_missing_caption"]) == (1, 1)
    assert s["skipped_total"] == 2
    # 12 batches of 2 = 12 passes of 2 usable samples, plus the one pass that filled the buffer
    assert L.epoch <= 14, L.epoch
    warned = [r.getMessage() for r in caplog.records if "shuffle_buffer=256" in r.getMessage()]
    assert len(warned) == 1 and "using 2" in warned[0], warned
    assert L.get_state()["shuffle_size"] == 2     # a resumed run keeps the shrunk buffer
    L.close()


def test_shrunk_buffer_and_distinct_counts_resume_exactly(tmp_path):
    cfg = _tiny_stream(tmp_path)
    check_resume(lambda: _loader(cfg, seed=3), 5, 6)


def test_buffer_larger_than_num_samples_warns_at_start(tmp_path, caplog):
    cfg = {**_tiny_stream(tmp_path), "num_samples": 2, "shuffle_buffer": 64}
    with caplog.at_level(logging.WARNING, logger="fluxflow_jax.data"):
        L = _loader(cfg)
    assert any("shuffle_buffer=64 is larger than num_samples=2" in r.getMessage()
               for r in caplog.records)
    L.close()
