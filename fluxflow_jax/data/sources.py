"""Map-style (random-access) image-text sources: local folder + captions file, JSONL, TFDS
ArrayRecord, and the procedural shapes generator.

A source knows how many samples it has, reads sample ``i`` as ``(opened PIL image, caption)``
and reports the ``(w, h)`` of an image cheaply (header only) for bucket assignment. Broken entries
raise :class:`BadSample`; caption-file problems found while parsing are counted in ``problems``.
Batching, ordering, threads and resumption live in ``map_loader.py``, so every source gets them.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from fluxflow_jax.data import shapes
from fluxflow_jax.data.errors import BadSample, BadSampleLog, DataError
from fluxflow_jax.data.transforms import decode_caption, normalize_caption, open_image


class MapSource:
    """Interface of a random-access image-text source (see module docstring)."""

    name: str = "train"
    description: str = ""
    problems: Counter

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def size(self, i: int) -> tuple[int, int]:
        """``(w, h)`` of image ``i`` without decoding its pixels."""
        return self.read(i)[0].size

    def where(self, i: int) -> str:
        return f"{self.description} sample {i}"

    def fingerprint(self) -> Any:
        """What identifies this source's content (for the scan cache and resume checks)."""
        return self.description


class CaptionFileSource(MapSource):
    """A folder of images and a captions file: ``name<TAB>caption`` lines (the reference's format)
    or JSONL ``{"image": name, "caption": text}`` lines (keys configurable).

    Lines are parsed from bytes so a single mis-encoded line is counted as ``bad_utf8`` instead of
    failing the whole file; lines without a tab or with an empty caption are counted too.

    Column rule (the reference's): a line splits at tabs into exactly two fields, ``name`` and
    ``caption`` (trailing empty fields are ignored). A line with more (a tab inside the caption, an extra column) is
    skipped as ``malformed_caption`` rather than guessed at: joining the rest would train on
    whatever the extra column holds (a URL, a score).

    A listed name must stay inside ``image_folder``: an absolute path or one that climbs out with
    ``..`` is refused while parsing, a symlink that leads out when the file is read (the path is
    resolved right before opening it, and the resolved path is what gets opened). Both count as
    ``outside_folder`` and nothing outside is opened: a captions file from the internet must not
    be able to make the loader read ``~/.ssh`` into a training batch or a latent cache.
    """

    def __init__(self, cfg: Mapping, name: str):
        self.name = name
        self.fmt = "jsonl" if cfg["type"] == "jsonl" else "tsv"
        self.captions_file = Path(cfg["captions_file"]).expanduser()
        folder = cfg.get("image_folder")
        self.image_folder = (Path(folder).expanduser() if folder
                             else self.captions_file.parent)
        self.description = f"{cfg['type']} {self.image_folder} ({self.captions_file.name})"
        if not self.captions_file.is_file():
            raise DataError(f"datasets.{name}.captions_file: {str(self.captions_file)!r} not found")
        if not self.image_folder.is_dir():
            raise DataError(f"datasets.{name}.image_folder: {str(self.image_folder)!r} is not a "
                            "directory")
        self.problems = Counter()
        self._root = self.image_folder.resolve()
        logger = BadSampleLog(name)
        prefix = cfg["fixed_prompt_prefix"]
        entries: list[tuple[str, str]] = []
        data = self.captions_file.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1].strip() == b"":
            lines = lines[:-1]  # the final newline does not start another line
        for lineno, raw in enumerate(lines, 1):
            where = f"{self.captions_file.name} line {lineno}"
            try:
                entries.append(self._parse(raw, prefix, cfg))
            except BadSample as e:
                self.problems[e.reason] += 1
                logger(where, e.reason, e.detail)
            if cfg["num_samples"] is not None and len(entries) >= cfg["num_samples"]:
                break
        self.entries = entries
        # content, not location: the same captions file on another disk is the same dataset
        self._fp = [self.fmt, hashlib.sha256(data).hexdigest()[:16], len(entries)]

    def _parse(self, raw: bytes, prefix: str | None, cfg: Mapping) -> tuple[str, str]:
        line = decode_caption(raw.rstrip(b"\r"))
        if not line.strip():
            raise BadSample("empty_line")
        if self.fmt == "tsv":
            parts = line.split("\t")
            while len(parts) > 2 and not parts[-1].strip():
                parts.pop()  # trailing tabs (an editor's, a spreadsheet's) are not a column
            if len(parts) < 2 or not parts[0].strip():
                raise BadSample("malformed_line", "expected name<TAB>caption")
            if len(parts) > 2:
                raise BadSample("malformed_caption", f"{len(parts)} tab-separated fields, "
                                "expected exactly name<TAB>caption")
            fname, caption = parts[0].strip(), parts[1]
        else:
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise BadSample("malformed_line", f"invalid JSON: {e}") from None
            ik, ck = cfg["image_key"], cfg["caption_key"]
            if not isinstance(obj, dict) or not isinstance(obj.get(ik), str) \
                    or not isinstance(obj.get(ck), str):
                raise BadSample("malformed_line", f"expected string fields {ik!r} and {ck!r}")
            fname, caption = obj[ik].strip(), obj[ck]
            if not fname:
                raise BadSample("malformed_line", f"empty {ik!r}")
        _check_relative(fname)
        return fname, normalize_caption(caption, prefix)

    def __len__(self) -> int:
        return len(self.entries)

    def path(self, i: int) -> Path:
        return self.image_folder / self.entries[i][0]

    def checked_path(self, i: int) -> Path:
        """The resolved path of sample ``i``; BadSample ``outside_folder`` when a symlink (of the
        file or a directory on the way) leads out of ``image_folder``."""
        p = self.path(i).resolve()
        if not p.is_relative_to(self._root):
            raise BadSample("outside_folder", f"{self.entries[i][0]!r} resolves outside "
                                              f"{self.image_folder}")
        return p

    def read(self, i: int) -> tuple[Image.Image, str]:
        return open_image(self.checked_path(i)), self.entries[i][1]

    def size(self, i: int) -> tuple[int, int]:
        return open_image(self.checked_path(i)).size

    def where(self, i: int) -> str:
        return str(self.path(i))

    def fingerprint(self) -> Any:
        return self._fp


class ShapesSource(MapSource):
    """The procedural shapes generator (``shapes.py``) as a dataset of ``num_samples`` images
    rendered at ``img_size``; its ground truth is ``scene(i)``."""

    def __init__(self, cfg: Mapping, name: str):
        self.name = name
        self.n = int(cfg["num_samples"])
        self.hw = (int(cfg["img_size"][0]), int(cfg["img_size"][1]))
        self.seed = int(cfg["generator_seed"])
        self.max_objects = int(cfg["max_objects"])
        self.prefix = cfg["fixed_prompt_prefix"]
        self.description = f"shapes(seed={self.seed}, n={self.n}, size={self.hw})"
        self.problems = Counter()
        # Rendering is ~0.4 ms per 64px image and holds the GIL; samples are pure functions of
        # the index, so keep them once rendered when the whole set fits in 512 MB.
        self._memo: dict[int, np.ndarray] | None = (
            {} if self.n * self.hw[0] * self.hw[1] * 3 <= 512 * 2**20 else None)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> shapes.ShapeScene:
        return shapes.scene(i, self.seed, self.max_objects)

    def read(self, i: int) -> tuple[Image.Image, str]:
        sc = self.scene(i)
        arr = None if self._memo is None else self._memo.get(i)
        if arr is None:
            arr = shapes.render(sc, self.hw)
            if self._memo is not None:
                self._memo[i] = arr
        return Image.fromarray(arr), normalize_caption(sc.caption, self.prefix)

    def size(self, i: int) -> tuple[int, int]:
        return self.hw[1], self.hw[0]

    def fingerprint(self) -> Any:
        return [self.description, self.max_objects]


class TfdsSource(MapSource):
    """Any TFDS dataset prepared in ArrayRecord format with an image and a text feature, read
    TF-free through ``as_data_source`` (random access). Images are read as their encoded bytes
    (``SkipDecoding``) and decoded here, so bad images are handled like every other source's."""

    def __init__(self, cfg: Mapping, name: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("datasets.{}: type 'tfds' needs the optional extra: pip install "
                              "'fluxflow_jax[tfds]' (tensorflow-datasets, array_record)"
                              .format(name)) from e
        self.name = name
        self.prefix = cfg["fixed_prompt_prefix"]
        tname, data_dir, split = cfg["tfds_name"], cfg["data_dir"], cfg["split"]
        self.tfds_name, self.split = tname, split
        self.description = f"tfds {tname} [{split}] in {data_dir}"
        try:
            builder = tfds.builder(tname, data_dir=data_dir)
        except Exception as e:
            raise DataError(f"datasets.{name}.tfds_name: cannot open {tname!r} in data_dir "
                            f"{data_dir!r}: {e}") from e
        feats = builder.info.features
        self.image_key = cfg["image_key"] or _pick_feature(
            feats, tfds.features.Image, ("image", "img"), "image_key", name)
        self.caption_key = cfg["caption_key"] or _pick_feature(
            feats, tfds.features.Text, ("caption", "text", "prompt", "captions"), "caption_key",
            name)
        for key, what in ((self.image_key, "image_key"), (self.caption_key, "caption_key")):
            if key is None or key not in feats:
                raise DataError(f"datasets.{name}.{what}: dataset {tname!r} has no such feature "
                                f"(features: {sorted(feats.keys())})")
        self.has_hw = all(k in feats for k in ("height", "width"))
        try:
            self.ds = builder.as_data_source(
                split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})
        except Exception as e:
            raise DataError(f"datasets.{name}: {self.description} cannot be read as a data "
                            f"source (prepared with file_format='array_record'?): {e}") from e
        self.n = len(self.ds) if cfg["num_samples"] is None else min(len(self.ds),
                                                                      cfg["num_samples"])
        self.problems = Counter()

    def __len__(self) -> int:
        return self.n

    def _record(self, i: int) -> Mapping:
        try:
            return self.ds[int(i)]
        except Exception as e:
            raise BadSample("corrupt_image", f"record {i}: {e}") from None

    def read(self, i: int) -> tuple[Image.Image, str]:
        rec = self._record(i)
        cap = rec[self.caption_key]
        cap = decode_caption(cap.item() if isinstance(cap, np.ndarray) else cap)
        return open_image(bytes(rec[self.image_key])), normalize_caption(cap, self.prefix)

    def size(self, i: int) -> tuple[int, int]:
        rec = self._record(i)
        if self.has_hw:
            return int(rec["width"]), int(rec["height"])
        return open_image(bytes(rec[self.image_key])).size

    def fingerprint(self) -> Any:
        return ["tfds", self.tfds_name, self.split, self.n, self.image_key, self.caption_key]


def _check_relative(fname: str) -> None:
    """Refuse, while parsing, a listed name that is absolute or climbs out with ``..`` (the
    symlink case needs the file system and is checked when the file is read)."""
    norm = os.path.normpath(fname)
    if os.path.isabs(norm) or os.path.splitdrive(norm)[0] or norm.split(os.sep)[0] == "..":
        raise BadSample("outside_folder", f"{fname!r} is not a path inside the image folder")


def _pick_feature(feats, kind, preferred: tuple[str, ...], what: str, name: str) -> str:
    """The feature of ``kind``: a conventional name if present, else the only one; several
    candidates are ambiguous (feature order in a loaded FeaturesDict is not reliable)."""
    keys = sorted(k for k, f in feats.items() if isinstance(f, kind))
    for p in preferred:
        if p in keys:
            return p
    if len(keys) == 1:
        return keys[0]
    raise DataError(f"datasets.{name}.{what}: cannot choose among features {keys}; set it")


def make_source(cfg: Mapping, name: str) -> MapSource:
    """The map-style source for a resolved config (folder, jsonl, tfds, shapes)."""
    typ = cfg["type"]
    if typ in ("folder", "jsonl"):
        return CaptionFileSource(cfg, name)
    if typ == "shapes":
        return ShapesSource(cfg, name)
    if typ == "tfds":
        return TfdsSource(cfg, name)
    raise ValueError(f"datasets.{name}.type: {typ!r} is not a map-style source")


def scan_sizes(source: MapSource, workers: int, cache_path: str | None = None) -> list:
    """``(w, h)`` per sample, or the BadSample reason string, read from headers with ``workers``
    threads; cached as JSON at ``cache_path`` keyed by the source fingerprint (rebuilt when the
    captions file, folder or sample count changes - the reference's cache only checked counts)."""
    fp = source.fingerprint()
    if cache_path and os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cached = json.load(f)
            if cached.get("version") == 1 and cached.get("source") == json.loads(json.dumps(fp)):
                return [tuple(x) if isinstance(x, list) else x for x in cached["sizes"]]
        except (OSError, ValueError):
            pass

    def one(i: int):
        try:
            return tuple(source.size(i))
        except BadSample as e:
            return e.reason

    n = len(source)
    if workers > 1 and n > 64:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as ex:
            sizes = list(ex.map(one, range(n), chunksize=64))
    else:
        sizes = [one(i) for i in range(n)]
    if cache_path:
        tmp = f"{cache_path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"version": 1, "source": fp,
                       "sizes": [list(s) if isinstance(s, tuple) else s for s in sizes]}, f)
        os.replace(tmp, cache_path)
    return sizes
