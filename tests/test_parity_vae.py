"""Runs the VAE parity checks on every fixture case of FluxCompressor / FluxExpander."""
import pytest
from parity_checks_vae import CHECKS
from parity_utils import cases

COMPONENTS = sorted(CHECKS)


def test_fixture_cases_exist():
    for comp in COMPONENTS:
        assert cases(comp), f"no parity fixture case for component {comp!r}"


@pytest.mark.parametrize("component,case", [(c, p) for c in COMPONENTS for p in cases(c)],
                         ids=lambda x: getattr(x, "name", x))
def test_vae_parity(component, case):
    CHECKS[component](case)
