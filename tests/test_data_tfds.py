"""TFDS: the packer writes an ArrayRecord dataset TF-free; the 'tfds' source reads it (and any
builder with an image and a text feature) with the same content, determinism, resume and host
split guarantees as a folder."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fluxflow_jax.data import DataError, make_loader, shapes, tokenize
from fluxflow_jax.data.tfds_pack import pack_folder
from fluxflow_jax.data.transforms import to_float
from test_data_helpers import (build_broken_folder, check_resume, odd_mode_images, row_keys,
                               shape_image, take, tok)


def loader(cfg, G=4, seed=0, pi=0, pc=1, **kw):
    return make_loader({**cfg, **kw}, global_batch_size=G, seed=seed, tokenizer=tok(),
                       process_index=pi, process_count=pc)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    folder_cfg, expected = build_broken_folder(root / "folder")
    res = pack_folder(folder_cfg["image_folder"], folder_cfg["captions_file"],
                      str(root / "data"), "tiny_packed")
    return folder_cfg, expected, res


def test_packer_skips_and_counts_bad_input(packed):
    _, expected, res = packed
    assert res["num_examples"] == 13            # 8 shapes + 4 odd modes + 1 extra
    assert res["skipped"] == expected


def test_tfds_content_equals_the_folder_content(packed):
    _, _, res = packed
    tcfg = {**res["config"], "img_size": 32, "resize_mode": "fixed", "max_length": 16}
    # every usable folder entry, as the folder loader would decode it
    pairs = [(shape_image(i), shapes.scene(i).caption) for i in range(8)]
    pairs += [(want, "an odd image") for _, want in odd_mode_images().values()]
    pairs += [(shape_image(50), "a shape")]
    ids, mask = tokenize(tok(), [c for _, c in pairs], 16)
    expected = {"image": to_float(np.stack([p for p, _ in pairs])), "input_ids": ids,
                "attention_mask": mask}
    # 13 usable samples: one epoch of global batch 13 holds each exactly once
    got = take(loader(tcfg, G=13), 1)
    assert sorted(row_keys(got)) == sorted(row_keys([expected]))
    assert "tensorflow" not in sys.modules         # read TF-free


def test_tfds_bucket_mode_uses_the_stored_sizes(packed):
    _, _, res = packed
    L = loader({**res["config"], "img_size": 32, "buckets": [[32, 32], [32, 48]],
                "max_length": 16}, G=1)
    assert L.stats()["skipped_total"] == 0 and L.epoch_length == 13
    assert {b["image"].shape for b in take(L, 13)} == {(1, 32, 32, 3)}


def test_tfds_determinism_resume_and_host_split(packed):
    _, _, res = packed
    cfg = {**res["config"], "img_size": 32, "resize_mode": "fixed", "max_length": 16}
    check_resume(lambda: loader(cfg, G=4, seed=3, crop="random", flip=True), 4, 4)
    whole = take(loader(cfg, G=4, seed=1), 6)
    halves = [take(loader(cfg, G=4, seed=1, pi=p, pc=2), 6) for p in range(2)]
    for w, a, b in zip(whole, *halves):
        for key in w:
            np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))


def test_missing_tfds_dataset_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"datasets\.train\.tfds_name"):
        loader({"type": "tfds", "tfds_name": "does_not_exist", "data_dir": str(tmp_path)})


def test_pack_command_line(tmp_path):
    cfg, _ = build_broken_folder(tmp_path / "f")
    r = subprocess.run([sys.executable, "-m", "fluxflow_jax.data.tfds_pack",
                        f"--image_folder={cfg['image_folder']}",
                        f"--captions_file={cfg['captions_file']}",
                        f"--data_dir={tmp_path / 'out'}", "--name=cli_packed"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "packed 13 examples" in r.stdout
    L = loader({"type": "tfds", "tfds_name": "cli_packed", "data_dir": str(tmp_path / "out"),
                "img_size": 32, "resize_mode": "fixed"}, G=13)
    assert next(L)["image"].shape == (13, 32, 32, 3)


def test_feature_keys_can_be_chosen(packed):
    _, _, res = packed
    cfg = {**res["config"], "img_size": 32, "resize_mode": "fixed", "max_length": 16,
           "shuffle": False}
    by_caption = next(loader(cfg, G=13))
    by_key = next(loader({**cfg, "caption_key": "key"}, G=13))
    np.testing.assert_array_equal(by_caption["image"], by_key["image"])
    names = {tok().decode(r, skip_special_tokens=True).replace(" ", "")
             for r in by_key["input_ids"]}
    assert "good_extra.png" in names and "palette.png" in names
    with pytest.raises(DataError, match=r"datasets\.train\.caption_key: .*no such feature"):
        loader({**cfg, "caption_key": "nope"})
