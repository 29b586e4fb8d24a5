"""WebDataset tar shards: content, url forms (braces, globs, pipe:, http), caption in JSON,
determinism, exact resume, host and worker splits, bucketing and bad input counted."""
from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
import time

import numpy as np
import pytest

from fluxflow_jax.data import DataError, make_loader, shapes, tokenize
from fluxflow_jax.data.demo import write_shapes_shards
from fluxflow_jax.data.transforms import to_float
from fluxflow_jax.data.webdataset_loader import expand_urls
from test_data_helpers import (assert_same_batches, check_resume, encode, row_keys, shape_image,
                               take, tok)

N, PER_SHARD = 24, 6


def loader(cfg, G=4, seed=0, pi=0, pc=1, **kw):
    base = {"img_size": 32, "resize_mode": "fixed", "max_length": 16, "shuffle_buffer": 0,
            "workers": 2}
    return make_loader({**base, **cfg, **kw}, global_batch_size=G, seed=seed, tokenizer=tok(),
                       process_index=pi, process_count=pc)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    return write_shapes_shards(root, N, PER_SHARD, img_size=32), root


def write_tar(path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def good(i, hw=(32, 32)):
    return {"__key__": f"g{i:05d}", "png": encode(shape_image(i, hw)),
            "txt": shapes.scene(i).caption.encode()}


def _table():
    return {i: (to_float(shape_image(i)), shapes.scene(i).caption) for i in range(N)}


def _index_of(img, table):
    hits = [i for i, (x, _) in table.items() if np.array_equal(x, img)]
    assert len(hits) == 1
    return hits[0]


def test_urls_expand_braces_lists_and_globs(shards):
    cfg, root = shards
    assert expand_urls([cfg["urls"]]) == [str(root / f"shard-{i:06d}.tar") for i in range(4)]
    assert expand_urls([str(root / "shard-*.tar")]) == expand_urls([cfg["urls"]])
    assert expand_urls(["a-{0..1}.tar::b.tar"]) == ["a-0.tar", "a-1.tar", "b.tar"]
    assert expand_urls(["pipe:cat x-{1..2}.tar"]) == ["pipe:cat x-1.tar", "pipe:cat x-2.tar"]


def test_first_epoch_holds_every_sample_once_with_its_caption(shards):
    cfg, _ = shards
    table = _table()
    L = loader(cfg, G=4)
    seen = []
    for b in take(L, N // 4):
        assert b["image"].shape == (4, 32, 32, 3)
        for r in range(4):
            i = _index_of(b["image"][r], table)
            want = tokenize(tok(), [table[i][1]], 16)[0][0]
            np.testing.assert_array_equal(b["input_ids"][r], want)
            seen.append(i)
    assert sorted(seen) == list(range(N))
    assert L.epoch == 1 or L.epoch == 0
    L.close()


def test_caption_inside_a_json_member(tmp_path):
    cfg = write_shapes_shards(tmp_path, 8, 4, img_size=32, caption_member="json")
    assert cfg["caption_key"] == "json" and cfg["caption_json_key"] == "prompt"
    table = {i: shapes.scene(i).caption for i in range(8)}
    b = next(loader(cfg, G=8, workers=1, shuffle=False))
    for r in range(8):
        np.testing.assert_array_equal(b["input_ids"][r], tokenize(tok(), [table[r]], 16)[0][0])


def test_pipe_and_http_urls_give_the_same_batches(shards):
    cfg, root = shards
    want = take(loader(cfg, seed=1), 6)
    piped = take(loader({**cfg, "urls": "pipe:cat " + cfg["urls"]}, seed=1), 6)
    assert_same_batches(want, piped)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/shard-{{000000..000003}}.tar"
        remote = loader({**cfg, "urls": url}, seed=1)
        got = take(remote, 6)
        assert_same_batches(want, got)
        assert remote.stats()["skipped_total"] == 0
        remote.close()
    finally:
        srv.shutdown()


def test_seeded_order_and_epoch_reshuffle(shards):
    cfg, _ = shards
    a = take(loader(cfg, seed=3, shuffle_buffer=8), 12)
    b = take(loader(cfg, seed=3, shuffle_buffer=8), 12)
    c = take(loader(cfg, seed=4, shuffle_buffer=8), 12)
    assert_same_batches(a, b)
    assert row_keys(a) != row_keys(c)
    run = take(loader(cfg, seed=3), 18)
    epochs = [row_keys(run[e * 6:(e + 1) * 6]) for e in range(3)]
    assert len({tuple(e) for e in epochs}) > 1            # shard order changes between epochs
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])


@pytest.mark.parametrize("k", [0, 1, 5, 7, 13])
def test_resume_at_any_batch_is_exact(shards, k):
    cfg, _ = shards
    check_resume(lambda: loader(cfg, seed=2, shuffle_buffer=5, crop="random", flip=True), k, 6)


@pytest.mark.parametrize("n_shards", [4, 1])
def test_two_hosts_read_disjoint_halves_of_the_data(tmp_path, n_shards):
    cfg = write_shapes_shards(tmp_path, N, N // n_shards, img_size=32)
    hosts = [loader(cfg, G=4, pi=p, pc=2, workers=1) for p in range(2)]
    keys = [row_keys(take(h, N // 4)) for h in hosts]     # 2 per host per batch: one epoch
    assert len(set(keys[0])) == N // 2 and len(set(keys[1])) == N // 2
    assert not set(keys[0]) & set(keys[1])
    whole = row_keys(take(loader(cfg, G=4, workers=1), N // 4))
    assert sorted(keys[0] + keys[1]) == sorted(whole)
    for h in hosts:
        h.close()


def test_workers_split_shards_without_duplicates(shards):
    cfg, _ = shards
    for w in (1, 2, 3, 4, 6):
        keys = row_keys(take(loader(cfg, G=4, workers=w), N // 4))
        assert len(set(keys)) == N, w


def test_bad_samples_and_shards_are_counted(tmp_path):
    corrupt = {"__key__": "b1", "png": b"not a png" * 10, "txt": b"a caption"}
    no_caption = {"__key__": "b2", "png": encode(shape_image(1))}
    no_image = {"__key__": "b3", "txt": b"a caption"}
    bad_utf8 = {"__key__": "b4", "png": encode(shape_image(2)), "txt": b"\xff\xfe oops"}
    empty_cap = {"__key__": "b5", "png": encode(shape_image(3)), "txt": b"   "}
    zero = {"__key__": "b6", "png": b"", "txt": b"a caption"}
    write_tar(tmp_path / "s0.tar", [corrupt, no_caption, no_image, bad_utf8, empty_cap, zero]
              + [good(i) for i in range(4)])
    write_tar(tmp_path / "s1.tar", [good(i) for i in range(4, 8)])
    with tarfile.open(tmp_path / "s1.tar") as tar:
        third = tar.getmembers()[2]          # g00005.png: cut in the middle of its data
    data = (tmp_path / "s1.tar").read_bytes()
    (tmp_path / "s1.tar").write_bytes(data[: third.offset_data + third.size // 2])
    write_tar(tmp_path / "s3.tar", [good(i) for i in range(8, 12)])
    urls = [str(tmp_path / n) for n in ("s0.tar", "s1.tar", "s2_missing.tar", "s3.tar")]
    L = loader({"type": "webdataset", "urls": urls}, G=2, workers=1, shuffle=False)
    table = {i: to_float(shape_image(i)) for i in range(12)}
    got = []
    for b in take(L, 4):
        for img in b["image"]:
            got.append([i for i, x in table.items() if np.array_equal(x, img)])
    assert all(len(g) == 1 for g in got)
    got = [g[0] for g in got]
    assert got == [0, 1, 2, 3, 4, 8, 9, 10]
    s = L.stats()
    assert (s["skipped_unreadable_image"], s["skipped_missing_caption"],
            s["skipped_missing_image"], s["skipped_bad_utf8"], s["skipped_empty_caption"],
            s["skipped_empty_file"], s["skipped_shard_error"]) == (1, 1, 1, 1, 1, 1, 2)
    L.close()


def test_json_caption_problems_are_counted(tmp_path):
    bad_json = {"__key__": "j1", "png": encode(shape_image(0)), "json": b"{oops"}
    no_field = {"__key__": "j2", "png": encode(shape_image(1)), "json": b'{"other": "x"}'}
    ok = [{"__key__": f"k{i}", "png": encode(shape_image(i)),
           "json": json.dumps({"meta": {"prompt": shapes.scene(i).caption}}).encode()}
          for i in range(2)]
    write_tar(tmp_path / "j.tar", [bad_json, no_field] + ok)
    L = loader({"type": "webdataset", "urls": str(tmp_path / "j.tar"), "caption_key": "json",
                "caption_json_key": "meta.prompt"}, G=2, workers=1, shuffle=False)
    b = next(L)
    np.testing.assert_array_equal(b["input_ids"][1],
                                  tokenize(tok(), [shapes.scene(1).caption], 16)[0][0])
    assert L.stats()["skipped_bad_json"] == 1 and L.stats()["skipped_missing_caption"] == 1


def test_stream_of_only_bad_samples_raises(tmp_path):
    write_tar(tmp_path / "x.tar", [{"__key__": f"b{i}", "png": b"junk" * 5, "txt": b"cap"}
                                   for i in range(3)])
    L = loader({"type": "webdataset", "urls": [str(tmp_path / "x.tar")] * 2}, G=2)
    t0 = time.time()
    with pytest.raises(DataError, match="a whole epoch without one usable sample.*"
                                        "unreadable_image"):
        next(L)
    assert time.time() - t0 < 30


def test_bucketed_stream_batches_share_a_shape_and_resume(tmp_path):
    samples = [good(i, (32, 32) if i % 3 else (32, 48)) for i in range(30)]
    for s in range(3):
        write_tar(tmp_path / f"b{s}.tar", samples[s * 10:(s + 1) * 10])
    cfg = {"type": "webdataset", "urls": str(tmp_path / "b{0..2}.tar"),
           "resize_mode": "bucket", "buckets": [[32, 32], [32, 48]], "shuffle_buffer": 4}
    seen = {tuple(b["image"].shape[1:3]) for b in take(loader(cfg, G=2), 20)}
    assert seen == {(32, 32), (32, 48)}
    check_resume(lambda: loader(cfg, G=2, seed=1), 7, 8)
    with pytest.raises(ValueError, match="resize_mode.*different batch shapes"):
        loader(cfg, G=2, pi=0, pc=2)


def test_state_with_other_worker_count_is_refused(shards):
    cfg, _ = shards
    st = loader(cfg, workers=2).get_state()
    with pytest.raises(DataError, match="workers"):
        loader(cfg, workers=3).set_state(st)
