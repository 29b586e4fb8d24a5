"""PatchDiscriminator / BertTextEncoder against the PyTorch reference fixtures."""
import pytest

from parity_checks_disc_text import CHECKS
from parity_utils import cases

CASES = [(comp, case) for comp in CHECKS for case in cases(comp)]


def test_every_component_has_a_fixture():
    assert {comp for comp, _ in CASES} == set(CHECKS)


@pytest.mark.parametrize("component,case", CASES, ids=lambda v: getattr(v, "name", v))
def test_matches_reference(component, case):
    CHECKS[component](case)
