"""Read tensors from a PyTorch ``.pth`` file without torch and without running its pickle.

A ``torch.save`` file is a pickle whose tensors point at raw storages. Unpickling it with the
standard ``pickle`` would import and call whatever the file names; here the unpickler resolves
only an allowlist (an ``OrderedDict``, the tensor/parameter rebuild functions and the typed
storage classes, all mapped to inert local stand-ins), like torch's own ``weights_only=True``
loader. Anything else is refused with the name of the global. Tensors are materialised lazily as
numpy arrays, so a 528 MB torchvision file costs only the tensors asked for.

Both on-disk formats are read: the zip archive of torch >= 1.6 (``<root>/data.pkl`` +
``<root>/data/<key>``) and the legacy sequential format of older files such as torchvision's
``vgg16-397923af.pth`` (magic number, protocol, sys info, the object pickle, the storage key list,
then per storage an int64 element count and the raw little-endian bytes).
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class TorchPickleError(ValueError):
    """The file is not a torch checkpoint this reader accepts (one line, names the file)."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    def __init__(self, dtype, key: str, numel: int, read: Callable[[str, Any, int], np.ndarray]):
        self.dtype, self.key, self.numel, self._read = dtype, key, numel, read

    def array(self) -> np.ndarray:
        return self._read(self.key, self.dtype, self.numel)


class LazyTensor:
    """A tensor of a torch file: ``shape`` without reading; ``numpy()`` reads its storage."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def numpy(self) -> np.ndarray:
        flat = self.storage.array()
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.shape, strides=tuple(s * item for s in self.stride))
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    return LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_rest):
    return data


_ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
_ALLOWED.update({("torch", n): _StorageType(n) for n in _DTYPES})


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, make_storage: Callable[[tuple], _Storage]):
        super().__init__(file)
        self._path, self._make = path, make_storage

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise TorchPickleError(f"{self._path}: refers to {module}.{name}, which is not a "
                                   "tensor container; only plain state dicts are read") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchPickleError(f"{self._path}: unexpected persistent id {pid!r:.60}")
        return self._make(pid)


def _dtype(storage_type: Any, path: Path):
    if not isinstance(storage_type, _StorageType):
        raise TorchPickleError(f"{path}: storage type {storage_type!r:.40} is not supported")
    return _DTYPES[storage_type.name]


def _load_zip(path: Path) -> Any:
    zf = zipfile.ZipFile(path)
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
        raise TorchPickleError(f"{path}: zip archive without a single data.pkl")
    root = pkl[0][: -len("data.pkl")]

    def read(key: str, dtype, numel: int) -> np.ndarray:
        raw = zf.read(f"{root}data/{key}")
        return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"), count=numel)

    def make(pid: tuple) -> _Storage:
        _, stype, key, _location, numel = pid[:5]
        return _Storage(_dtype(stype, path), str(key), int(numel), read)

    with zf.open(pkl[0]) as f:
        return _Unpickler(io.BytesIO(f.read()), path, make).load()


def _load_legacy(path: Path) -> Any:
    storages: dict[str, _Storage] = {}
    offsets: dict[str, int] = {}

    def read(key: str, dtype, numel: int) -> np.ndarray:
        with open(path, "rb") as f:
            f.seek(offsets[key])
            return np.frombuffer(f.read(numel * np.dtype(dtype).itemsize),
                                 dtype=np.dtype(dtype).newbyteorder("<"), count=numel)

    def make(pid: tuple) -> _Storage:
        _, stype, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise TorchPickleError(f"{path}: storage views are not supported")
        key = str(key)
        storages.setdefault(key, _Storage(_dtype(stype, path), key, int(numel), read))
        return storages[key]

    with open(path, "rb") as f:
        for what in ("magic number", "protocol version", "sys info"):
            head = _Unpickler(f, path, make).load()
            if what == "magic number" and head != LEGACY_MAGIC:
                raise TorchPickleError(f"{path}: not a torch checkpoint (bad magic number)")
        obj = _Unpickler(f, path, make).load()
        keys = _Unpickler(f, path, make).load()
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            st = storages[str(key)]
            offsets[st.key] = f.tell()
            f.seek(numel * np.dtype(st.dtype).itemsize, io.SEEK_CUR)
    return obj


def load_torch_state_dict(path: str | Path) -> dict[str, LazyTensor]:
    """``{key: LazyTensor}`` of a ``torch.save``'d state dict (either format), never executing
    code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"torch checkpoint not found: {path}")
    try:
        obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    except TorchPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError, ValueError) as e:
        raise TorchPickleError(f"{path}: not a readable torch checkpoint ({e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, LazyTensor) for v in obj.values()):
        raise TorchPickleError(f"{path}: expected a state dict of tensors")
    return dict(obj)
