"""Every parity case under $FLUXFLOW_PARITY_DIR, dispatched by its config.json component.

Adding a fixture folder (any size) adds a test; a component nobody checks fails loudly rather
than being skipped.
"""
import importlib
import json

import pytest

from parity_utils import parity_dir

CHECK_MODULES = ["parity_checks_bezier", "parity_checks_vae", "parity_checks_flow",
                 "parity_checks_disc_text", "parity_checks_engine", "parity_checks_pipeline"]
# Folders that hold no numeric case (key/shape manifests are checked by the export tests).
NON_CASES = {"manifest_phase1"}


def _registry():
    reg = {}
    for name in CHECK_MODULES:
        reg.update(importlib.import_module(name).CHECKS)
    return reg


def _all_cases():
    root = parity_dir()
    return sorted(p.parent for p in root.glob("*/config.json"))


def test_parity_dir_has_cases():
    assert _all_cases(), f"no parity cases found in {parity_dir()} (set FLUXFLOW_PARITY_DIR)"


@pytest.mark.parametrize("case", _all_cases(), ids=lambda p: p.name)
def test_case_matches_reference(case):
    component = json.loads((case / "config.json").read_text())["component"]
    checks = _registry()
    assert component in checks, f"{case}: no parity check for component {component!r}"
    checks[component](case)


@pytest.mark.parametrize("component", sorted(_registry()))
def test_every_checked_component_has_a_case(component):
    comps = {json.loads((c / "config.json").read_text())["component"] for c in _all_cases()}
    assert component in comps, f"no fixture case for {component!r} in {parity_dir()}"
