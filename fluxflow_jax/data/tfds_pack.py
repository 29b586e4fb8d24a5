"""Pack a local folder + captions file into a TFDS ArrayRecord dataset (random access, TF-free).

    python -m fluxflow_jax.data.tfds_pack --image_folder=DIR --captions_file=FILE \
        --data_dir=OUT --name=my_images [--format=tsv|jsonl] [--version=1.0.0]

then train with ``{'type': 'tfds', 'tfds_name': 'my_images', 'data_dir': OUT}``. Why: a folder of a
million small files is slow to list, open and stat on network disks; ArrayRecord shards are few
large files with O(1) random access, which is what the deterministic map-style loader needs.

Each example holds the original encoded bytes when they are already RGB JPEG/PNG (no
re-compression), otherwise an RGB PNG; plus ``caption``, ``height``, ``width`` (so bucket
assignment needs no image decode) and ``key`` (the file name). Broken images and caption lines
are skipped, counted and reported, exactly as the folder loader would.
"""
from __future__ import annotations

import io
import logging
import sys
from collections import Counter

from absl import app, flags

from fluxflow_jax.data.config import resolve
from fluxflow_jax.data.errors import BadSample, DataError, format_counts
from fluxflow_jax.data.sources import CaptionFileSource
from fluxflow_jax.data.transforms import load_pixels, open_image, to_rgb

log = logging.getLogger("fluxflow_jax.data")


def _encoded_rgb(path) -> tuple[bytes, int, int]:
    img = open_image(path)
    fmt = img.format
    load_pixels(img)
    w, h = img.size
    if fmt in ("JPEG", "PNG") and img.mode == "RGB":
        with open(path, "rb") as f:
            return f.read(), h, w
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG")
    return buf.getvalue(), h, w


def pack_folder(image_folder: str, captions_file: str, data_dir: str, name: str,
                fmt: str = "tsv", version: str = "1.0.0", split: str = "train") -> dict:
    """Write the dataset; returns ``{'num_examples', 'skipped': {reason: n}, 'config': ds_cfg}``."""
    import numpy as np
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered

    cfg = resolve({"type": "folder" if fmt == "tsv" else "jsonl", "image_folder": image_folder,
                   "captions_file": captions_file}, name)
    source = CaptionFileSource(cfg, name)
    skipped = Counter(source.problems)
    kept = []

    def examples():
        for i in range(len(source)):
            try:
                # checked_path: a name leading out of the folder is skipped, never packed
                data, h, w = _encoded_rgb(source.checked_path(i))
            except BadSample as e:
                skipped[e.reason] += 1
                log.warning("tfds_pack: skipped %s: %s", source.path(i), e.reason)
                continue
            kept.append(i)
            fname, caption = source.entries[i]
            yield f"{i:09d}", {"image": data, "caption": caption, "height": h, "width": w,
                               "key": fname}

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "caption": tfds.features.Text(),
        "height": np.int32, "width": np.int32,
        "key": tfds.features.Text(),
    })

    # Defined inside skip_registration: TFDS registers builder classes by name at class
    # creation, and packing twice in one process must not collide.
    with registered.skip_registration():
        class _Packed(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=features,
                                             description=f"packed from {captions_file}")

            def _split_generators(self, dl_manager):
                return {split: examples()}

            def _generate_examples(self):  # pragma: no cover - unused, see _split_generators
                raise NotImplementedError

        _Packed.name = name
        builder = _Packed(data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
    if not kept and not builder.info.splits[split].num_examples:
        raise DataError(f"tfds_pack: no usable image in {image_folder} "
                        f"(skipped: {format_counts(skipped)})")
    n = int(builder.info.splits[split].num_examples)
    log.info("tfds_pack: %s/%s: %d examples, skipped: %s", data_dir, name, n,
             format_counts(skipped))
    return {"num_examples": n, "skipped": dict(skipped),
            "config": {"type": "tfds", "tfds_name": name, "data_dir": data_dir, "split": split}}


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("image_folder", None, "folder of images")
    flags.DEFINE_string("captions_file", None, "captions file (name<TAB>caption or JSONL)")
    flags.DEFINE_enum("format", "tsv", ["tsv", "jsonl"], "captions file format")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into")
    flags.DEFINE_string("name", None, "dataset name (lower_snake_case)")
    flags.DEFINE_string("version", "1.0.0", "dataset version")
    flags.DEFINE_string("split", "train", "split name")
    for f in ("image_folder", "captions_file", "data_dir", "name"):
        flags.mark_flag_as_required(f)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO)
    res = pack_folder(FLAGS.image_folder, FLAGS.captions_file, FLAGS.data_dir, FLAGS.name,
                      FLAGS.format, FLAGS.version, FLAGS.split)
    print(f"packed {res['num_examples']} examples; skipped: {format_counts(res['skipped'])}")
    print(f"dataset config: {res['config']}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
    sys.exit(0)
