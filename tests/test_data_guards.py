"""New dataset guards: ``min_size`` (validated, raised by ``make_loader(min_size=)``), fingerprints
unchanged for configs written before the new keys, and latent-cache manifests that cannot point
outside their folder."""
from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
from broken_corpus import watch_opens
from PIL import ImageFile
from test_data_cache import encode_image, encode_text
from test_data_helpers import encode, shape_image, take, tok

from fluxflow_jax.data import DataError, build_latent_cache, make_loader, params_fingerprint


def _loader(cfg, G=2, **kw):
    return make_loader(cfg, global_batch_size=G, seed=0, tokenizer=tok(), process_index=0,
                       process_count=1, **kw)


def _sized_folder(root, sizes):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (h, w) in enumerate(sizes):
        (root / f"{i}.png").write_bytes(encode(shape_image(i, (h, w))))
        lines.append(f"{i}.png\ta shape {i}")
    (root / "c.txt").write_text("\n".join(lines) + "\n")
    return {"type": "folder", "image_folder": str(root), "captions_file": str(root / "c.txt"),
            "img_size": 32, "resize_mode": "fixed", "max_length": 16, "shuffle": False}


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_min_size_is_validated(bad):
    with pytest.raises(ValueError, match=r"datasets\.train\.min_size: must be an int >= 1"):
        _loader({"type": "shapes", "num_samples": 8, "min_size": bad})


def test_min_size_from_config_and_from_make_loader(tmp_path):
    cfg = _sized_folder(tmp_path / "d", [(24, 24), (32, 32), (12, 40), (32, 32)])
    L = _loader(cfg, G=1)
    take(L, 4)
    assert L.stats()["skipped_total"] == 1 and L.stats()["skipped_too_small"] == 1  # 12x40
    # the model's downscale factor (say 32) raises the floor; a lower one does not lower it
    L = _loader(cfg, G=1, min_size=32)
    take(L, 4)
    assert L.stats()["skipped_too_small"] == 2
    L = _loader({**cfg, "min_size": 32}, G=1, min_size=8)
    take(L, 4)
    assert L.stats()["skipped_too_small"] == 2
    L = _loader({**cfg, "min_size": 1}, G=1)
    take(L, 4)
    assert L.stats()["skipped_total"] == 0


def test_fingerprints_of_older_configs_are_unchanged():
    """Values computed before ``min_size``, ``token_env`` and ``headers`` existed: checkpoints
    and latent caches made then still resume and match."""
    shapes_cfg = {"type": "shapes", "num_samples": 8, "img_size": 32, "resize_mode": "fixed"}
    wds = {"type": "webdataset", "urls": "/x/shard-{0..3}.tar"}
    assert _loader(shapes_cfg).fingerprint == "eb59614304ae9ab1"
    assert _loader({**shapes_cfg, "min_size": 16}).fingerprint == "eb59614304ae9ab1"
    assert _loader({**shapes_cfg, "min_size": 20}).fingerprint != "eb59614304ae9ab1"
    assert _loader(wds).fingerprint == "cd3ee46245253ee0"
    # a token in the url (or a rotated one) is the same data
    tok_url = {"type": "webdataset", "urls": "https://u:p@h/x/shard-{0..3}.tar?token=abc"}
    assert _loader(tok_url).fingerprint == _loader(
        {**tok_url, "urls": "https://h/x/shard-{0..3}.tar"}).fingerprint


def test_load_truncated_images_setting_is_warned_about(tmp_path, monkeypatch, caplog):
    cfg = _sized_folder(tmp_path / "d", [(32, 32)] * 2)
    full = (tmp_path / "d" / "1.png").read_bytes()
    (tmp_path / "d" / "1.png").write_bytes(full[: len(full) // 2])
    L = _loader(cfg, G=1)
    take(L, 2)
    assert L.stats()["skipped_truncated_image"] == 1
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with caplog.at_level(logging.WARNING, logger="fluxflow_jax.data"):
        L = _loader(cfg, G=1)
    assert any("LOAD_TRUNCATED_IMAGES is True" in r.getMessage() for r in caplog.records)
    take(L, 2)
    assert L.stats()["skipped_total"] == 0        # what the warning is about


def _cache(tmp_path):
    cfg = _sized_folder(tmp_path / "d", [(32, 32)] * 6)
    enc = params_fingerprint({"w": np.ones(2)})
    path = build_latent_cache(cfg, encode_image, encode_text, tmp_path / "cache",
                              encoder_fingerprint=enc, tokenizer=tok(), shard_size=2,
                              batch_size=2)
    return path, json.loads((path / "manifest.json").read_text())


def test_cache_shards_outside_the_cache_folder_are_skipped_unopened(tmp_path):
    path, manifest = _cache(tmp_path)
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 2]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    s0, s1 = manifest["shards"][0]["file"], manifest["shards"][1]["file"]
    shutil.move(path / s0, outside / s0)                 # listed as ../elsewhere/<file>
    manifest["shards"][0]["file"] = f"../elsewhere/{s0}"
    shutil.copy(path / s1, outside / s1)                 # a symlink that leads out
    os.remove(path / s1)
    os.symlink(outside / s1, path / s1)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with watch_opens(outside) as opened:
        L = _loader({"type": "cache", "path": str(path)}, G=2)
        batches = take(L, 3)
        stats = L.stats()
        L.close()
    assert stats["skipped_outside_folder"] == 4 and stats["skipped_total"] == 4
    assert L.epoch_length == 1
    assert all(b["latent"].shape[0] == 2 for b in batches)
    assert opened == []
    manifest["shards"][2]["file"] = "/" + str(outside / s0).lstrip("/")
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="no usable sample out of 6.*outside_folder=6"):
        _loader({"type": "cache", "path": str(path)}, G=2)
