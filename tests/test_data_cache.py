"""Latent/text-embedding cache: built once with stand-in encoders, read back exactly, keyed by
dataset and encoder fingerprints, loaded with the same determinism/resume/host-split contract."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fluxflow_jax.data import (DataError, build_latent_cache, cache_fingerprint, find_latent_cache,
                               make_loader, open_latent_cache, params_fingerprint, tokenize,
                               write_shapes_folder)
from fluxflow_jax.data.transforms import to_float
from test_data_helpers import build_broken_folder, check_resume, row_keys, shape_image, take, tok


def encode_image(images):
    """Stand-in VAE: 4x4 average pool -> tokens [B, h*w, 3], plus a per-image mean."""
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
    return {"latent": pooled.reshape(b, -1, c).astype(np.float32),
            "latent_mean": images.mean((1, 2)).astype(np.float32)}


def encode_text(ids, mask):
    """Stand-in text encoder: masked one-hot bag of ids, [B, 64]."""
    onehot = np.zeros((ids.shape[0], 64), np.float32)
    for r in range(ids.shape[0]):
        for t, m in zip(ids[r], mask[r]):
            if m:
                onehot[r, t % 64] += 1
    return onehot


ENC = params_fingerprint({"vae": {"w": np.arange(6.0).reshape(2, 3)}, "te": np.ones(3)})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachef")
    cfg = write_shapes_folder(root / "f", 12, img_size=32)
    # two buckets: 8 square images and 4 wide ones
    from test_data_helpers import encode
    lines = open(cfg["captions_file"]).read().splitlines()
    for i in range(8, 12):
        (root / "f" / f"{i:06d}.png").write_bytes(encode(shape_image(i, (32, 48))))
    cfg.update(img_size=32, buckets=[[32, 32], [32, 48]], max_length=16)
    assert len(lines) == 12
    return cfg


def test_params_fingerprint_sees_any_change():
    a = {"vae": {"w": np.arange(6.0).reshape(2, 3)}, "te": np.ones(3)}
    b = {"vae": {"w": np.arange(6.0).reshape(2, 3)}, "te": np.ones(3)}
    assert params_fingerprint(a) == params_fingerprint(b) == ENC
    b["vae"]["w"][1, 2] += 1e-6
    assert params_fingerprint(b) != ENC
    assert params_fingerprint({"vae": {"v": a["vae"]["w"]}, "te": a["te"]}) != ENC


def test_cache_holds_exactly_the_encoder_outputs(folder, tmp_path):
    path = build_latent_cache(folder, encode_image, encode_text, tmp_path / "c",
                              encoder_fingerprint=ENC, tokenizer=tok(), batch_size=3,
                              shard_size=4)
    man = open_latent_cache(path)
    assert man["num_samples"] == 12 and {tuple(s["bucket"]) for s in man["shards"]} == {
        (32, 32), (32, 48)}
    assert all(s["count"] <= 6 for s in man["shards"])  # shard_size splits buckets
    L = make_loader({"type": "cache", "path": str(path)}, global_batch_size=4, seed=0,
                    tokenizer=None, process_index=0, process_count=1)
    assert L.epoch_length == 3
    got = take(L, 3)
    for b in got:
        assert set(b) == {"latent", "latent_mean", "text_embedding", "input_ids",
                          "attention_mask"}
    # expected rows: the encoders applied to every image of the folder
    want = []
    caps = [ln.split("\t")[1] for ln in open(folder["captions_file"]).read().splitlines()]
    for i in range(12):
        img = to_float(shape_image(i, (32, 32) if i < 8 else (32, 48))[None])
        ids, mask = tokenize(tok(), [caps[i]], 16)
        want.append({**encode_image(img), "text_embedding": encode_text(ids, mask),
                     "input_ids": ids, "attention_mask": mask})
    got_rows = []
    for b in got:
        for r in range(4):
            got_rows.append({k: v[r:r + 1] for k, v in b.items()})
    assert sorted(row_keys(got_rows)) == sorted(row_keys(want))


def test_fingerprint_detects_dataset_and_encoder_changes(folder, tmp_path):
    path = build_latent_cache(folder, encode_image, encode_text, tmp_path / "c",
                              encoder_fingerprint=ENC, tokenizer=tok())
    fp = cache_fingerprint(folder, ENC)
    assert open_latent_cache(path, fp)["fingerprint"] == fp
    assert find_latent_cache(path, folder, ENC) == str(path)
    assert find_latent_cache(path, folder, "other-encoder") is None
    assert find_latent_cache(path, {**folder, "img_size": 48}, ENC) is None
    assert find_latent_cache(path, {**folder, "fixed_prompt_prefix": "x"}, ENC) is None
    assert find_latent_cache(tmp_path / "nothing", folder, ENC) is None
    with pytest.raises(DataError, match="does not match"):
        open_latent_cache(path, "0" * 16)
    with pytest.raises(DataError, match="does not match"):
        make_loader({"type": "cache", "path": str(path), "fingerprint": "0" * 16},
                    global_batch_size=2, seed=0, tokenizer=None, process_index=0,
                    process_count=1)
    # same inputs: kept as is; other encoders: refused unless overwrite
    mtime = (path / "manifest.json").stat().st_mtime_ns
    build_latent_cache(folder, encode_image, encode_text, path, encoder_fingerprint=ENC,
                       tokenizer=tok())
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="overwrite"):
        build_latent_cache(folder, encode_image, encode_text, path, encoder_fingerprint="new",
                           tokenizer=tok())
    build_latent_cache(folder, encode_image, encode_text, path, encoder_fingerprint="new",
                       tokenizer=tok(), overwrite=True)
    assert json.loads((path / "manifest.json").read_text())["encoder_fingerprint"] == "new"


def test_cache_loader_resumes_and_splits_hosts(folder, tmp_path):
    path = str(build_latent_cache(folder, encode_image, encode_text, tmp_path / "c",
                                  encoder_fingerprint=ENC, tokenizer=tok(), shard_size=5))

    def mk(pi=0, pc=1, seed=1):
        return make_loader({"type": "cache", "path": path}, global_batch_size=4, seed=seed,
                           tokenizer=None, process_index=pi, process_count=pc)

    check_resume(mk, 4, 4)
    whole = take(mk(), 6)
    halves = [take(mk(p, 2), 6) for p in range(2)]
    for w, a, b in zip(whole, *halves):
        for key in w:
            np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))


def test_bad_samples_are_left_out_of_the_cache(tmp_path):
    cfg, expected = build_broken_folder(tmp_path / "d")
    path = build_latent_cache(cfg, encode_image, encode_text, tmp_path / "c",
                              encoder_fingerprint=ENC, tokenizer=tok())
    man = open_latent_cache(path)
    assert man["num_samples"] == 13
    assert man["skipped"] == expected


def test_streams_cannot_be_cached_directly(tmp_path):
    from fluxflow_jax.data.demo import write_shapes_shards
    cfg = write_shapes_shards(tmp_path / "s", 4, 4, img_size=32)
    with pytest.raises(TypeError, match="map-style"):
        build_latent_cache(cfg, encode_image, encode_text, tmp_path / "c",
                           encoder_fingerprint=ENC, tokenizer=tok())


def _first_shapes(batches: list[dict], keys) -> list[dict]:
    seen: list[dict] = []
    for b in batches:
        shapes = {k: tuple(b[k].shape) for k in keys}
        if shapes not in seen:
            seen.append(shapes)
    return seen


@pytest.mark.parametrize("kind", ["folder", "cache"])
def test_upcoming_shapes_are_the_shapes_the_next_batches_bring_in_order(folder, tmp_path, kind):
    """What ``compile_ahead`` compiles: each bucket shape of the next n batches, in the order
    they first come, as host-local shapes - from any position, across epochs, on any host."""
    src = folder
    if kind == "cache":
        src = {"type": "cache", "path": str(build_latent_cache(
            folder, encode_image, encode_text, tmp_path / "c", encoder_fingerprint=ENC,
            tokenizer=tok(), shard_size=5))}
    for pi, pc, skip, n in [(0, 1, 0, 1), (0, 1, 0, 7), (0, 1, 2, 4), (1, 2, 3, 9)]:
        loader = make_loader(src, global_batch_size=4, seed=pi + skip, tokenizer=tok(),
                             process_index=pi, process_count=pc)
        take(loader, skip)
        want = loader.upcoming_shapes(n)
        keys = sorted(want[0])
        assert keys == (["image"] if kind == "folder" else  # every stored array
                        ["attention_mask", "input_ids", "latent", "latent_mean", "text_embedding"])
        got = _first_shapes(take(loader, n), keys)
        assert want == got, (pi, pc, skip, n)
        assert all(s[keys[0]][0] == 4 // pc for s in want)
    assert len(want) == 2  # 9 batches over 3 epochs of 2 square and 1 wide batch: both
