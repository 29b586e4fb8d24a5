"""Discovery and loading of the PyTorch-reference parity fixtures.

Cases live in ``$FLUXFLOW_PARITY_DIR`` (default ``tests/fixtures/parity``), one folder each with
``config.json`` (``component`` + ``kwargs``), ``io.safetensors`` and, for models,
``weights.safetensors``. Tests discover cases by component name, so fixture sets made at other
sizes work without code changes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

DEFAULT_DIR = Path(__file__).parent / "fixtures" / "parity"


def parity_dir() -> Path:
    return Path(os.environ.get("FLUXFLOW_PARITY_DIR", DEFAULT_DIR))


def cases(component: str) -> list[Path]:
    """Every case folder whose config.json names ``component``."""
    root = parity_dir()
    found = []
    for cfg in sorted(root.glob("*/config.json")):
        if json.loads(cfg.read_text()).get("component") == component:
            found.append(cfg.parent)
    return found


def load_case(case: Path) -> tuple[dict, dict, dict]:
    """(config, io tensors, weights) of one case; weights is {} when the case has none."""
    cfg = json.loads((case / "config.json").read_text())
    io = load_file(str(case / "io.safetensors"))
    w = case / "weights.safetensors"
    weights = load_file(str(w)) if w.exists() else {}
    return cfg, io, weights


def assert_close_ref(ours, ref, name: str = "", rel: float = 1e-4) -> None:
    """The fixtures' rule: ``max|ours - ref| <= rel * max(1, max|ref|)``."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs reference {ref.shape}"
    tol = rel * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    assert err <= tol, f"{name}: max abs error {err:.3e} > tolerance {tol:.3e}"


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), 1, -1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1))
