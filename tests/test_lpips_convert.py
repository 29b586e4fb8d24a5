"""``python -m fluxflow_jax.convert lpips``: torch-format VGG16 + lpips head files -> the
``loss.lpips_weights`` file, read without torch; then LPIPS and the VAE step with LPIPS on it.

torch is not a dependency, so the test writes ``.pth`` files in torch's two on-disk formats
itself: the pickle opcodes name ``torch.FloatStorage`` / ``torch._utils._rebuild_tensor_v2``,
which stand-in modules provide while the file is written (removed again afterwards).
"""
import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from fluxflow_jax import lpips, optim, sharding, steps
from fluxflow_jax.interop.lpips import convert_lpips
from fluxflow_jax.interop.torch_pickle import LEGACY_MAGIC, TorchPickleError, load_torch_state_dict
from fluxflow_jax.models import registry
from fluxflow_jax.state import create_train_state, step_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named like torch's, so ``pickle`` can write references to its globals."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage, torch._utils = FloatStorage, utils
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Storage:
    def __init__(self, key, data):
        self.key, self.data = key, np.ascontiguousarray(data, dtype="<f4").ravel()


class _Tensor:
    def __init__(self, storage, shape, stride):
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self):
        fn = sys.modules["torch._utils"]._rebuild_tensor_v2
        return fn, (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict())


def _tensors(sd):
    out, storages = collections.OrderedDict(), []
    for i, (k, v) in enumerate(sd.items()):
        st = _Storage(str(i), v)
        storages.append(st)
        out[k] = _Tensor(st, tuple(np.shape(v)), tuple(s // 4 for s in np.zeros(np.shape(v),
                                                                                np.float32).strides))
    return out, storages


def write_pth(path, sd, legacy, fake_torch):
    """``torch.save(sd, path)`` in the legacy or the zip format, without torch."""
    objs, storages = _tensors(sd)
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    pid_len = 6 if legacy else 5
    p.persistent_id = lambda o: (("storage", fake_torch.FloatStorage, o.key, "cpu",
                                  o.data.size, None)[:pid_len] if isinstance(o, _Storage) else None)
    p.dump(objs)
    if legacy:
        with open(path, "wb") as f:
            for head in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
                pickle.dump(head, f, protocol=2)
            f.write(buf.getvalue())
            pickle.dump([s.key for s in storages], f, protocol=2)
            f.writelines(struct.pack("<q", s.data.size) + s.data.tobytes() for s in storages)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", buf.getvalue())
            z.writestr("archive/version", "3\n")
            for s in storages:
                z.writestr(f"archive/data/{s.key}", s.data.tobytes())


def torch_layout(params):
    """Our LPIPS params -> torchvision VGG16 keys (+ its classifier) and lpips head keys."""
    vgg = {}
    for name, conv in params["vgg"].items():
        idx = name.split("_")[1]
        vgg[f"features.{idx}.weight"] = np.asarray(conv["kernel"]).transpose(3, 2, 0, 1)
        vgg[f"features.{idx}.bias"] = np.asarray(conv["bias"])
    vgg["classifier.0.weight"] = np.ones((4, 8), np.float32)  # dropped by the converter
    lin = {f"lin{k}.model.1.weight": np.asarray(params[f"lin{k}"]).reshape(1, -1, 1, 1)
           for k in range(5)}
    return vgg, lin


@pytest.fixture(scope="module")
def lp_params():
    p = lpips.init_lpips(jax.random.key(3))
    # nonzero biases, so a swapped bias shows up
    for i, conv in enumerate(p["vgg"].values()):
        conv["bias"] = jnp.full_like(conv["bias"], 0.01 * (i + 1))
    return p


def _convert(*args):
    r = subprocess.run([sys.executable, "-m", "fluxflow_jax.convert", "lpips", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=False)
    return r.returncode, r.stdout, r.stderr


def test_torch_pickle_reader_formats_strides_and_refusals(tmp_path, fake_torch):
    base = np.arange(6, dtype=np.float32)
    for legacy in (True, False):
        path = tmp_path / f"t{legacy}.pth"
        write_pth(path, {"a": base.reshape(2, 3)}, legacy, fake_torch)
        np.testing.assert_array_equal(load_torch_state_dict(path)["a"].numpy(), base.reshape(2, 3))
    objs, _ = _tensors({"a": base})
    objs["a"].shape, objs["a"].stride = (3, 2), (1, 3)  # a transposed view of a [2, 3] storage
    path = tmp_path / "view.pth"
    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        p = pickle.Pickler(buf, protocol=2)
        p.persistent_id = lambda o: (("storage", fake_torch.FloatStorage, "0", "cpu", 6)
                                     if isinstance(o, _Storage) else None)
        p.dump(objs)
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/data/0", base.tobytes())
    np.testing.assert_array_equal(load_torch_state_dict(path)["a"].numpy(), base.reshape(2, 3).T)

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned > " + str(tmp_path / "pwned"),)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(TorchPickleError, match=r"evil.pth: refers to .*system"):
        load_torch_state_dict(path)
    assert not (tmp_path / "pwned").exists()


def test_convert_lpips_cli_and_distance(tmp_path, lp_params, fake_torch):
    vgg, lin = torch_layout(lp_params)
    write_pth(tmp_path / "vgg16-397923af.pth", vgg, True, fake_torch)  # torchvision: legacy
    write_pth(tmp_path / "vgg.pth", lin, False, fake_torch)
    out = tmp_path / "lpips_vgg16.safetensors"
    rc, stdout, err = _convert("--vgg", tmp_path / "vgg16-397923af.pth",
                               "--lin", tmp_path / "vgg.pth", "--out", out)
    assert rc == 0, err
    assert f"loss.lpips_weights={out}" in stdout
    loaded = lpips.load_lpips_weights(str(out))
    assert jax.tree.structure(loaded) == jax.tree.structure(lp_params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(lp_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # LPIPS on two 32 px images with the converted weights.
    r = np.random.default_rng(0)
    x = jnp.asarray(r.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    y = jnp.clip(x + 0.3 * jnp.asarray(r.standard_normal((2, 32, 32, 3)), jnp.float32), -1, 1)
    dist = jax.jit(lpips.lpips_distance)
    d_xy, d_xx = np.asarray(dist(loaded, x, y)), np.asarray(dist(loaded, x, x))
    assert np.all(np.isfinite(d_xy)) and np.all(d_xy > 1e-4) and np.all(d_xx < 1e-6)
    # .safetensors inputs work the same; swapped files are refused with the expected name.
    save_file(lin, str(tmp_path / "lin.safetensors"))
    rc, _, err = _convert("--vgg", tmp_path / "vgg16-397923af.pth",
                          "--lin", tmp_path / "lin.safetensors", "--out", tmp_path / "b.st")
    assert rc == 0, err
    rc, _, err = _convert("--vgg", tmp_path / "vgg.pth", "--lin", tmp_path / "vgg.pth",
                          "--out", tmp_path / "c.safetensors")
    assert rc == 2 and err.count("\n") == 1 and "vgg16-397923af.pth" in err, err
    assert not (tmp_path / "c.safetensors").exists()


def test_vae_step_with_converted_lpips(tmp_path, lp_params):
    vgg, lin = torch_layout(lp_params)
    save_file(vgg, str(tmp_path / "vgg.safetensors"))
    save_file(lin, str(tmp_path / "lin.safetensors"))
    weights = tmp_path / "lpips.safetensors"
    convert_lpips(tmp_path / "vgg.safetensors", tmp_path / "lin.safetensors", weights)
    model_cfg = {"vae_dim": 8, "downscales": 2, "upscales": 2, "vae_attn_layers": 0,
                 "vae_attn_heads": 2, "flow_dim": 16, "flow_layers": 1, "flow_heads": 2,
                 "text_embedding_dim": 16}
    models = registry.build_models(model_cfg, {"compressor", "expander"})
    params, _ = registry.init_params(models, jax.random.key(0, impl="rbg"), (16, 16))
    params = jax.tree.map(np.array, jax.device_get(params))  # host copy: states are donated
    labels = optim.param_labels(step_params("vae", params),
                                {"compressor": "vae", "expander": "vae"})
    tx = optim.make_partitioned({"frozen": None, "vae": optim.make_optimizer(
        {"type": "Adam", "lr": 1e-3}, None, 100, name="optimizers.vae")}, labels)
    mesh = sharding.make_mesh()
    img = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    batch = sharding.put_batch({"image": img}, mesh)
    metrics = {}
    for use in (True, False):
        cfg = {"use_lpips": use, "lpips_weights": str(weights), "lambda_lpips": 0.5,
               "adaptive_weights": False, "use_gan": False}
        state = create_train_state(jax.tree.map(jnp.array, params), {"vae": tx})
        sh = sharding.tree_shardings(state, mesh)
        step = steps.make_vae_step(models, tx, cfg, mesh, sh)
        _, m = step(jax.device_put(state, sh), batch, jax.random.key(1))
        metrics[use] = {k: float(v) for k, v in m.items()}
    lp = metrics[True]["train/lpips"]
    assert np.isfinite(lp) and lp > 1e-4
    assert "train/lpips" not in metrics[False]
    np.testing.assert_allclose(metrics[True]["train/loss_recon"] - metrics[False]["train/loss_recon"],
                               0.5 * lp, rtol=1e-4)
