"""Map-style loaders (folder + captions file, JSONL, shapes): content, determinism, epoch
reshuffle, exact resume, per-host split, bucketing, and bad input counted instead of crashing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fluxflow_jax.data import DataError, make_loader, shapes, tokenize, write_shapes_folder
from fluxflow_jax.data.transforms import to_float
from test_data_helpers import (assert_same_batches, build_broken_folder, check_resume, encode,
                               odd_mode_images, row_keys, take, tok)


def loader(cfg, G=4, seed=0, pi=0, pc=1, **kw):
    return make_loader({**cfg, **kw}, global_batch_size=G, seed=seed, tokenizer=tok(),
                       process_index=pi, process_count=pc)


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    cfg = write_shapes_folder(root, 24, img_size=32)
    cfg.update(img_size=32, resize_mode="fixed", max_length=16)
    return cfg


def _source_table(cfg):
    """caption and float pixels of every image of a written shapes folder."""
    rows = {}
    for line in open(cfg["captions_file"]):
        name, cap = line.rstrip("\n").split("\t")
        arr = np.asarray(Image.open(f"{cfg['image_folder']}/{name}").convert("RGB"))
        rows[name] = (to_float(arr), cap)
    return rows


def test_folder_batches_hold_the_files_pixels_and_their_captions(shapes_folder):
    table = _source_table(shapes_folder)
    L = loader(shapes_folder, G=4, workers=2)
    assert L.epoch_length == 6
    seen = []
    for b in take(L, 6):
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape == (4, 16)
        for r in range(4):
            match = [n for n, (img, _) in table.items() if np.array_equal(img, b["image"][r])]
            assert len(match) >= 1
            ids, mask = tokenize(tok(), [table[match[0]][1]], 16)
            np.testing.assert_array_equal(b["input_ids"][r], ids[0])
            np.testing.assert_array_equal(b["attention_mask"][r], mask[0])
            seen.append(match[0])
    assert sorted(seen) == sorted(table)  # one epoch = every sample exactly once
    L.close()


def test_same_seed_same_order_other_seed_other_order_and_epochs_reshuffle(shapes_folder):
    a = take(loader(shapes_folder, seed=5), 12)
    b = take(loader(shapes_folder, seed=5, workers=0), 12)
    c = take(loader(shapes_folder, seed=6), 6)
    assert_same_batches(a, b)  # threads or not, same batches
    assert row_keys(a[:6]) != row_keys(c)
    ep0, ep1 = row_keys(a[:6]), row_keys(a[6:12])
    assert ep0 != ep1 and sorted(ep0) == sorted(ep1)


def test_unshuffled_order_is_the_file_order(shapes_folder):
    table = _source_table(shapes_folder)
    b = next(loader(shapes_folder, shuffle=False))
    names = sorted(table)[:4]
    for r, n in enumerate(names):
        np.testing.assert_array_equal(b["image"][r], table[n][0])


@pytest.mark.parametrize("k", [0, 3, 6, 8])
def test_resume_yields_exactly_the_uninterrupted_batches(shapes_folder, k):
    check_resume(lambda: loader(shapes_folder, seed=2, crop="random", flip=True), k, 5)


def test_two_hosts_see_disjoint_halves_that_make_the_global_batch(shapes_folder):
    whole = take(loader(shapes_folder, G=4), 8)
    h0 = take(loader(shapes_folder, G=4, pi=0, pc=2), 8)
    h1 = take(loader(shapes_folder, G=4, pi=1, pc=2), 8)
    for w, a, b in zip(whole, h0, h1):
        assert a["image"].shape[0] == 2
        for key in w:
            np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))
    keys0, keys1 = row_keys(h0[:6]), row_keys(h1[:6])
    assert not set(keys0) & set(keys1)
    assert sorted(keys0 + keys1) == sorted(row_keys(whole[:6]))


def test_global_batch_must_divide_across_hosts(shapes_folder):
    with pytest.raises(ValueError, match="not divisible by the process count 2"):
        loader(shapes_folder, G=5, pi=0, pc=2)


def test_random_crop_and_flip_are_deterministic_per_sample(tmp_path):
    cfg = write_shapes_folder(tmp_path, 8, img_size=48)
    cfg.update(img_size=32, resize_mode="fixed", crop="random", flip=True, max_length=8,
               shuffle=False)
    a = take(loader(cfg, G=8), 3)
    b = take(loader(cfg, G=8, workers=0), 3)
    assert_same_batches(a, b)
    # a new epoch draws new crops/flips for the same samples
    assert not np.array_equal(a[0]["image"], a[1]["image"])


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_bad_input_is_skipped_counted_and_never_yielded(tmp_path, fmt):
    cfg, expected = build_broken_folder(tmp_path / "d", fmt=fmt)
    # 18 listed image entries, global batch 6: epoch 0 visits every entry once
    L = loader(cfg, G=6, workers=2)
    assert L.epoch_length * 6 == 18
    good = [to_float(np.asarray(Image.open(p).convert("RGB")))
            for p in sorted((tmp_path / "d").glob("good*.png"))]
    good += [to_float(want) for _, want in odd_mode_images().values()]
    for b in take(L, 3):
        for img in b["image"]:
            assert any(np.array_equal(img, g) for g in good)
    stats = L.stats()
    for reason, n in expected.items():
        assert stats[f"skipped_{reason}"] == n, (reason, stats)
    assert stats["skipped_total"] == sum(expected.values())
    state = L.get_state()
    assert state["skipped"] == expected
    json.dumps(state)
    L.close()


def test_bad_input_in_bucket_mode_is_found_by_the_header_scan(tmp_path):
    cfg, expected = build_broken_folder(tmp_path / "d")
    cfg.update(resize_mode="bucket", buckets=[[32, 32], [32, 48]])
    L = loader(cfg, G=2)
    # missing, zero-byte and unidentifiable files are known before the first batch
    s = L.stats()
    assert (s["skipped_missing_file"], s["skipped_empty_file"]) == (1, 1)
    assert s["skipped_unreadable_image"] == 1
    take(L, 2 * L.epoch_length)
    assert L.stats()["skipped_truncated_image"] == 1 + 1
    L.close()


def test_resume_with_bad_samples_keeps_counters(tmp_path):
    cfg, _ = build_broken_folder(tmp_path / "d")
    check_resume(lambda: loader(cfg, G=6, seed=4), 2, 4)


def test_all_bad_folder_raises_naming_the_source(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(4):
        (root / f"x{i}.png").write_bytes(b"garbage" * 20)
    (root / "c.txt").write_text("".join(f"x{i}.png\tcap\n" for i in range(4)))
    cfg = {"type": "folder", "image_folder": str(root), "captions_file": str(root / "c.txt"),
           "img_size": 32, "resize_mode": "fixed"}
    with pytest.raises(DataError, match=r"bad.*every sample of bucket 32x32 is unusable"):
        next(loader(cfg, G=2))
    with pytest.raises(DataError, match="no usable sample out of 4"):
        loader({**cfg, "resize_mode": "bucket"}, G=2)


def test_captions_file_without_a_valid_line_raises(tmp_path):
    (tmp_path / "c.txt").write_bytes(b"no tab here\n\xff\xfe\n")
    cfg = {"type": "folder", "image_folder": str(tmp_path), "captions_file":
           str(tmp_path / "c.txt")}
    with pytest.raises(DataError, match="no usable sample out of 0 listed.*bad_utf8=1"):
        loader(cfg)


def test_missing_captions_file_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"datasets\.train\.captions_file"):
        loader({"type": "folder", "image_folder": str(tmp_path),
                "captions_file": str(tmp_path / "nope.txt")})


def test_bucket_mode_groups_sizes_and_never_mixes_them(tmp_path):
    lines = []
    for i in range(12):
        hw = (32, 32) if i % 2 else (32, 48)
        (tmp_path / f"{i}.png").write_bytes(encode(shapes.render(shapes.scene(i), hw)))
        lines.append(f"{i}.png\t{shapes.scene(i).caption}")
    (tmp_path / "c.txt").write_text("\n".join(lines))
    cfg = {"type": "folder", "image_folder": str(tmp_path), "captions_file":
           str(tmp_path / "c.txt"), "img_size": 32, "buckets": [[32, 32], [32, 48]],
           "max_length": 16, "scan_cache": str(tmp_path / "scan.json")}
    L = loader(cfg, G=3)
    shapes_seen = set()
    for b in take(L, 2 * L.epoch_length):
        h, w = b["image"].shape[1:3]
        assert h % 16 == 0 and w % 16 == 0
        shapes_seen.add((h, w))
    assert shapes_seen == {(32, 32), (32, 48)}
    assert (tmp_path / "scan.json").is_file()
    # the scan cache gives the same plan
    assert_same_batches(take(loader(cfg, G=3), 4), take(loader(cfg, G=3), 4))


def test_native_buckets_follow_the_reference_size_rule(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(np.zeros((40, 70, 3), np.uint8)))
    (tmp_path / "c.txt").write_text("a.png\tcap\n")
    cfg = {"type": "folder", "image_folder": str(tmp_path), "captions_file":
           str(tmp_path / "c.txt"), "buckets": "native", "img_size": 256}
    b = next(loader(cfg, G=1))
    assert b["image"].shape == (1, 48, 80, 3)  # short 40 -> 48, long 70 -> 80, ratio kept best


def test_fixed_prompt_prefix_is_applied(shapes_folder):
    b = next(loader(shapes_folder, shuffle=False, fixed_prompt_prefix="a photo"))
    cap = open(shapes_folder["captions_file"]).readline().split("\t")[1].strip()
    want, _ = tokenize(tok(), [f"a photo. {cap}"], 16)
    np.testing.assert_array_equal(b["input_ids"][0], want[0])


def test_jsonl_captions_give_the_same_batches_as_tsv(shapes_folder, tmp_path):
    cfg = write_shapes_folder(tmp_path, 24, img_size=32, captions="jsonl")
    assert cfg["type"] == "jsonl" and cfg["captions_file"].endswith(".jsonl")
    cfg.update(img_size=32, resize_mode="fixed", max_length=16)
    for pi, pc in ((0, 1), (1, 2)):
        assert_same_batches(take(loader(shapes_folder, seed=7, pi=pi, pc=pc), 8),
                            take(loader(cfg, seed=7, pi=pi, pc=pc), 8))
    check_resume(lambda: loader(cfg, seed=7), 5, 3)


def test_default_process_index_and_count_come_from_jax(shapes_folder):
    import jax
    L = make_loader(shapes_folder, global_batch_size=4, seed=0, tokenizer=tok())
    assert (L.process_index, L.process_count) == (jax.process_index(), jax.process_count())
    assert_same_batches(take(L, 2), take(loader(shapes_folder), 2))


def test_shapes_source_matches_the_generator():
    L = loader({"type": "shapes", "num_samples": 16, "img_size": 32, "resize_mode": "fixed",
                "shuffle": False, "max_length": 16}, G=4)
    b = next(L)
    for r in range(4):
        img, cap, _ = shapes.sample(r, 0, 32)
        np.testing.assert_array_equal(b["image"][r], to_float(img))
        np.testing.assert_array_equal(b["input_ids"][r], tokenize(tok(), [cap], 16)[0][0])
    cfg = {"type": "shapes", "num_samples": 16, "img_size": 32, "max_length": 16}
    check_resume(lambda: loader(cfg, G=4, seed=9), 5, 3)
    whole = take(loader(cfg, G=4, seed=9), 4)
    halves = [take(loader(cfg, G=4, seed=9, pi=p, pc=2), 4) for p in range(2)]
    for w, a, b in zip(whole, *halves):
        for key in w:
            np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))


def test_state_from_another_dataset_or_batch_size_is_refused(shapes_folder):
    st = loader(shapes_folder, G=4).get_state()
    with pytest.raises(DataError, match="global_batch_size"):
        loader(shapes_folder, G=2).set_state(st)
    with pytest.raises(DataError, match="different dataset content"):
        loader({**shapes_folder, "fixed_prompt_prefix": "x"}, G=4).set_state(st)


def test_state_carries_the_seed_and_resumes_on_another_host_count(shapes_folder):
    ref = loader(shapes_folder, G=4, seed=2)
    take(ref, 5)
    state = json.loads(json.dumps(ref.get_state()))
    want = take(ref, 4)
    other_seed = loader(shapes_folder, G=4, seed=99)
    other_seed.set_state(state)
    assert_same_batches(want, take(other_seed, 4))
    hosts = [loader(shapes_folder, G=4, seed=99, pi=p, pc=2) for p in range(2)]
    for h in hosts:
        h.set_state(state)
    got = [take(h, 4) for h in hosts]
    for w, a, b in zip(want, *got):
        for key in w:
            np.testing.assert_array_equal(w[key], np.concatenate([a[key], b[key]]))


def test_a_copied_dataset_resumes_but_an_edited_one_does_not(shapes_folder, tmp_path):
    import shutil
    ref = loader(shapes_folder, seed=1)
    take(ref, 3)
    state = json.loads(json.dumps(ref.get_state()))
    want = take(ref, 3)
    copy = tmp_path / "moved"
    shutil.copytree(shapes_folder["image_folder"], copy)
    moved = {**shapes_folder, "image_folder": str(copy),
             "captions_file": str(copy / "captions.txt")}
    resumed = loader(moved, seed=1)
    resumed.set_state(state)
    assert_same_batches(want, take(resumed, 3))
    with open(copy / "captions.txt", "a") as f:
        f.write("000000.png\tone more line\n")
    with pytest.raises(DataError, match="different dataset content"):
        loader(moved, seed=1).set_state(state)


def test_shipped_demo_photo_loads_offline():
    from fluxflow_jax.data import demo_photos_config
    L = loader(demo_photos_config(img_size=64, max_length=16), G=1)
    assert L.stats()["skipped_total"] == 0 and L.epoch_length == 1
    b = next(L)
    assert b["image"].shape == (1, 64, 64, 3)
    assert b["image"].std() > 0.1                    # a real picture, not a flat fill
    assert tok().unk_token_id not in b["input_ids"][0]
