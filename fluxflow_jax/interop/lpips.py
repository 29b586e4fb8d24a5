"""The LPIPS weights file (``loss.lpips_weights``) from the two files the VGG LPIPS is made of.

Inputs (download them once, elsewhere; fluxflow_jax never fetches):

* ``--vgg``: torchvision's ImageNet VGG16, ``vgg16-397923af.pth`` (what
  ``torchvision.models.vgg16(weights='IMAGENET1K_V1')`` downloads); keys ``features.{N}.*``.
* ``--lin``: the lpips package's linear heads, ``lpips/weights/v0.1/vgg.pth``; keys
  ``lin{k}.model.1.weight``.

Either may be a ``.pth`` (read by ``interop.torch_pickle``: no torch needed, nothing in the file
is executed) or a ``.safetensors`` with the same keys. The output is one safetensors file with
``features.{N}.{weight,bias}`` (OIHW, as ``fluxflow_jax.lpips.load_lpips_weights`` reads) and
``lin{k}.model.1.weight``; the 123M-parameter ``classifier.*`` of the VGG file is dropped. The
output is checked by loading it back with ``load_lpips_weights`` before it is moved in place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fluxflow_jax.interop.torch_pickle import load_torch_state_dict
from fluxflow_jax.lpips import CHANNELS, VGG16_BLOCKS, load_lpips_weights

PathLike = str | Path


def _read(path: PathLike, keys: list[str], flag: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: {path} is not a file")
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
        get = lambda k: sd[k]
    else:
        sd = load_torch_state_dict(path)
        get = lambda k: sd[k].numpy()
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KeyError(f"{flag} {path}: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                       f"is it the right file ({'vgg16-397923af.pth' if flag == '--vgg' else 'lpips weights/v0.1/vgg.pth'})?")
    return {k: np.ascontiguousarray(get(k), dtype=np.float32) for k in keys}


def vgg_keys() -> list[str]:
    return [f"features.{idx}.{p}" for block in VGG16_BLOCKS for idx, _ in block
            for p in ("weight", "bias")]


def lin_keys() -> list[str]:
    return [f"lin{k}.model.1.weight" for k in range(len(CHANNELS))]


def convert_lpips(vgg: PathLike, lin: PathLike, out: PathLike) -> Path:
    """Write ``out`` (the ``loss.lpips_weights`` file) from the VGG16 and lpips head files."""
    tensors = {**_read(vgg, vgg_keys(), "--vgg"), **_read(lin, lin_keys(), "--lin")}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"source": f"{Path(vgg).name} + "
                                           f"{Path(lin).name}"})
    try:
        load_lpips_weights(str(tmp))  # shapes checked by the loader the training step uses
    except (KeyError, ValueError) as e:
        tmp.unlink()
        raise ValueError(f"{vgg} / {lin}: {e}") from None
    tmp.replace(out)
    return out
