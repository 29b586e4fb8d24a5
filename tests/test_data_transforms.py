"""Transforms (RGB conversion, buckets, resize/crop/flip, scaling), config validation, the demo
tokenizer and the shapes generator."""
from __future__ import annotations

import io
import json
import math
import threading

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data import (DEMO_TOKENIZER_DIR, BadSample, load_tokenizer, make_loader,
                               select_dataset, shapes, tokenize, validate_dataset_config,
                               validate_datasets, write_wordpiece_tokenizer)
from fluxflow_jax.data.config import resolve
from fluxflow_jax.data.transforms import (auto_buckets, load_pixels, min_distortion_size,
                                          native_bucket, nearest_bucket, normalize_caption,
                                          open_image, resize_crop, to_float, to_rgb, to_uint8)
from test_data_helpers import encode, odd_mode_images, tok


# ----------------------------------------------------------------------------- pixels

@pytest.mark.parametrize("name", ["gray.png", "rgba.png", "palette.png", "deep16.png"])
def test_odd_modes_become_the_right_rgb(name):
    data, want = odd_mode_images()[name]
    got = np.asarray(to_rgb(load_pixels(open_image(data))))
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, want)


def test_float_range_is_minus_one_to_one_and_inverts():
    x = np.array([0, 1, 127, 128, 254, 255], np.uint8)
    f = to_float(x)
    assert f.dtype == np.float32 and f[0] == -1.0 and f[-1] == 1.0
    np.testing.assert_allclose(f, x / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(to_uint8(f), x)


def test_bad_bytes_raise_badsample_with_reason():
    with pytest.raises(BadSample) as e:
        open_image(b"")
    assert e.value.reason == "empty_file"
    with pytest.raises(BadSample) as e:
        open_image(b"\x89PNG garbage")
    assert e.value.reason == "unreadable_image"
    data = encode(np.zeros((64, 64, 3), np.uint8) + 7)
    with pytest.raises(BadSample) as e:
        load_pixels(open_image(data[: len(data) - 40]))
    assert e.value.reason in ("truncated_image", "corrupt_image")


def test_decompression_bombs_are_skipped(monkeypatch):
    data = encode(np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: a "bomb"
    with pytest.raises(BadSample) as e:
        load_pixels(open_image(data))
    assert e.value.reason == "too_large"


# ----------------------------------------------------------------------------- buckets

def _reference_rule(w, h, lo, hi):
    """The reference's grid search written out as loops (independent of the numpy version)."""
    lo16, hi16 = math.ceil(lo / 16) * 16, math.floor(hi / 16) * 16
    best = None
    for hh in range(lo16, hi16 + 1, 16):        # meshgrid row-major: h outer, w inner
        for ww in range(lo16, hi16 + 1, 16):
            d = abs(math.log((ww / hh) / (w / h)))
            key = (d, ww * hh)
            if best is None or key < best[0]:
                best = (key, (ww, hh))
    return best[1]


@pytest.mark.parametrize("seed", range(5))
def test_min_distortion_size_matches_the_reference_rule(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        w, h = int(rng.integers(17, 400)), int(rng.integers(17, 400))
        lo = min(w, h)
        hi = math.ceil(max(w, h) / 16) * 16
        got = min_distortion_size(w, h, lo, hi)
        want = _reference_rule(w, h, lo, hi)
        assert got[0] % 16 == 0 and got[1] % 16 == 0
        # equal distortion and area (ties between equal keys may pick either cell)
        assert abs(math.log((got[0] / got[1]) / (w / h))) == pytest.approx(
            abs(math.log((want[0] / want[1]) / (w / h))), abs=1e-12)
        assert got[0] * got[1] == want[0] * want[1]


def test_native_bucket_keeps_grid_sizes_and_applies_the_cap():
    assert native_bucket(64, 32, None) == (32, 64)
    assert native_bucket(70, 40, None) == (48, 80)
    h, w = native_bucket(4000, 3000, 256)
    assert max(h, w) <= 256 and h % 16 == 0 and w % 16 == 0
    assert abs((w / h) / (4 / 3) - 1) < 0.05


def test_auto_buckets_are_equal_area_grid_sizes():
    b = auto_buckets((256, 256), 2.0)
    assert (256, 256) in b and len(b) > 5
    for h, w in b:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(h * w / 256**2 - 1) < 0.1
    assert nearest_bucket(400, 200, b)[1] > nearest_bucket(400, 200, b)[0]
    assert nearest_bucket(300, 300, b) == (256, 256)


def test_resize_crop_center_random_and_flip():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255                       # left half white, right half black
    img = lambda: Image.open(io.BytesIO(encode(arr)))  # noqa: E731
    out = resize_crop(img(), (32, 32), stretch=False, crop="center", flip=False, rng=None)
    assert out.shape == (32, 32, 3)
    # cover-resize to 32x64 then center crop: left half white, right half black
    assert out[:, :12].min() > 200 and out[:, 20:].max() < 50
    flipped = resize_crop(img(), (32, 32), stretch=False, crop="center", flip=True,
                          rng=np.random.default_rng(1))
    plain = resize_crop(img(), (32, 32), stretch=False, crop="random", flip=False,
                        rng=np.random.default_rng(1))
    again = resize_crop(img(), (32, 32), stretch=False, crop="random", flip=False,
                        rng=np.random.default_rng(1))
    np.testing.assert_array_equal(plain, again)
    outs = {resize_crop(img(), (32, 32), stretch=False, crop="random", flip=False,
                        rng=np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(outs) > 1
    assert flipped.shape == (32, 32, 3)
    stretched = resize_crop(img(), (48, 48), stretch=True, crop="center", flip=False, rng=None)
    assert stretched.shape == (48, 48, 3)


def test_big_jpeg_decodes_through_draft_to_the_same_picture():
    arr = np.zeros((512, 512, 3), np.uint8)
    arr[:256] = (200, 30, 30)
    arr[256:] = (30, 30, 200)
    data = encode(arr, "JPEG")
    out = resize_crop(Image.open(io.BytesIO(data)), (32, 32), stretch=False, crop="center",
                      flip=False, rng=None)
    assert out.shape == (32, 32, 3)
    assert np.abs(out[:12].astype(int) - (200, 30, 30)).max() < 20
    assert np.abs(out[20:].astype(int) - (30, 30, 200)).max() < 20


def test_caption_normalisation_and_prefix():
    assert normalize_caption("  a\n red\tcircle ", None) == "a red circle"
    assert normalize_caption("a red circle", "a photo") == "a photo. a red circle"
    with pytest.raises(BadSample):
        normalize_caption(" \n ", "prefix")


# ----------------------------------------------------------------------------- config

def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ValueError, match=r"datasets\.train\.imgsize: unknown key"):
        resolve({"type": "shapes", "imgsize": 32})
    with pytest.raises(ValueError, match=r"datasets\.laion\.urls: unknown key .*'webdataset'"):
        resolve({"type": "folder", "urls": "x", "image_folder": "a", "captions_file": "b"},
                "laion")


@pytest.mark.parametrize("cfg,key", [
    ({"type": "folder", "captions_file": "c"}, "image_folder"),
    ({"type": "shapes", "img_size": 40}, "img_size"),
    ({"type": "shapes", "buckets": [[32, 20]]}, "buckets"),
    ({"type": "shapes", "crop": "middle"}, "crop"),
    ({"type": "shapes", "flip": 1}, "flip"),
    ({"type": "shapes", "resize_mode": "pad"}, "resize_mode"),
    ({"type": "nope"}, "type"),
    ({"type": "shapes", "max_objects": 3}, "max_objects"),
])
def test_bad_values_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=rf"datasets\.train\.{key}:"):
        resolve(cfg)


def test_error_list_validator_and_prefixed_names():
    assert validate_dataset_config({"type": "shapes"}, name="datasets.train") == []
    assert validate_dataset_config({"type": "shapes", "flip": 1}, name="datasets.demo") == [
        "datasets.demo.flip: must be a bool, got 1"]
    L = make_loader({"type": "shapes", "num_samples": 8, "img_size": 32, "max_length": 8},
                    global_batch_size=2, seed=0, tokenizer=tok(), process_index=0,
                    process_count=1, name="datasets.demo", max_length=12)
    assert L.name == "demo" and next(L)["input_ids"].shape == (2, 12)


def test_configdict_and_named_datasets_validate():
    c = ml_collections.ConfigDict({"train": {"type": "shapes", "img_size": 32},
                                   "eval": {"type": "shapes", "img_sz": 32}})
    with pytest.raises(ValueError, match=r"datasets\.eval\.img_sz: unknown key"):
        validate_datasets(c)
    ok = validate_datasets(ml_collections.ConfigDict({"train": {"type": "shapes"}}))
    assert ok["train"]["num_samples"] == 10000 and ok["train"]["img_size"] == [64, 64]
    datasets = {"shapes": {"type": "shapes"}, "photos": {"type": "shapes", "img_size": 32}}
    assert select_dataset(datasets, "photos")["img_size"] == [32, 32]
    assert select_dataset(datasets, None, default="shapes")["img_size"] == [64, 64]
    with pytest.raises(ValueError, match=r"stage dataset 'laion' is not in datasets \(have: "
                                         r"\['photos', 'shapes'\]\)"):
        select_dataset(datasets, "laion")
    L = make_loader(ml_collections.ConfigDict({"type": "shapes", "num_samples": 8,
                                               "img_size": 32, "max_length": 8}),
                    global_batch_size=2, seed=0, tokenizer=tok(), process_index=0,
                    process_count=1)
    assert next(L)["image"].shape == (2, 32, 32, 3)


# ----------------------------------------------------------------------------- tokenizer

def test_demo_tokenizer_specials_and_coverage():
    t = load_tokenizer("demo")
    assert t.pad_token_id == 0
    assert [t.convert_tokens_to_ids(x) for x in ("[UNK]", "[CLS]", "[SEP]", "[MASK]")] == \
        [1, 2, 3, 4]
    for i in range(200):
        cap = shapes.scene(i).caption
        ids = t(cap)["input_ids"]
        assert t.unk_token_id not in ids, cap
        assert t.decode(ids, skip_special_tokens=True) == cap
    ids = t("Grace Hopper, zebra!")["input_ids"]
    assert t.unk_token_id not in ids  # unknown words fall back to letter pieces


def test_tokenize_pads_truncates_and_is_int32():
    ids, mask = tokenize(tok(), ["a red circle", "a " * 50], 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
    assert ids[0].tolist()[:5] == [2, tok().convert_tokens_to_ids("a"),
                                   tok().convert_tokens_to_ids("red"),
                                   tok().convert_tokens_to_ids("circle"), 3]
    assert ids[0, 5:].tolist() == [0, 0, 0] and mask[0].tolist() == [1] * 5 + [0] * 3
    assert mask[1].tolist() == [1] * 8 and ids[1, -1] == 3


def test_tokenize_is_safe_from_many_threads():
    errors, results = [], []

    def work():
        try:
            for _ in range(50):
                results.append(tokenize(tok(), ["a blue square"] * 3, 12 + len(results) % 3)[0])
        except Exception as e:  # "Already borrowed" without the lock
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and len(results) == 200


def test_shipped_tokenizer_is_reproducible(tmp_path):
    words = shapes.vocabulary() + (DEMO_TOKENIZER_DIR.parent / "tokenizer_words.txt").read_text(
    ).split()
    write_wordpiece_tokenizer(tmp_path, words)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / f).read_bytes() == (DEMO_TOKENIZER_DIR / f).read_bytes(), f
    assert json.loads((DEMO_TOKENIZER_DIR / "tokenizer_config.json").read_text())[
        "tokenizer_class"] == "BertTokenizer"


def test_tokenizer_path_must_be_local(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_tokenizer("bert-base-uncased")
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- shapes

def test_shapes_are_deterministic_and_seeded():
    a, ca, sa = shapes.sample(7, seed=1, size=32)
    b, cb, sb = shapes.sample(7, seed=1, size=32)
    np.testing.assert_array_equal(a, b)
    assert ca == cb and sa == sb
    assert all(shapes.scene(i, seed=2) != shapes.scene(i, seed=1) for i in range(5))
    assert len({shapes.scene(i).caption for i in range(20)}) > 10


def test_shapes_captions_describe_the_pixels():
    n_rel = 0
    for i in range(60):
        img, cap, sc = shapes.sample(i, size=64)
        assert cap == sc.caption
        words = cap.split()
        assert words[0] in ("a", "an") and sc.objects[0].color in words
        for o in sc.objects:
            mask = shapes.object_mask(o, 64)
            assert mask.sum() > 20
            mean = img[mask].astype(float).mean(0)
            assert np.abs(mean - shapes.COLORS[o.color]).max() < 25, (cap, mean)
        if sc.relation is not None:
            n_rel += 1
            a, b = sc.objects
            assert f" {sc.relation} " in cap
            if sc.relation == "above":
                assert a.cy < b.cy
            elif sc.relation == "below":
                assert a.cy > b.cy
            elif sc.relation == "left of":
                assert a.cx < b.cx
            else:
                assert a.cx > b.cx
            assert a.color != b.color
    assert n_rel > 30
    json.dumps(shapes.scene(3).to_dict())


def test_shapes_render_any_size():
    img = shapes.render(shapes.scene(1), (32, 48))
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8
