"""The property harness over every registered feature and sampled combinations."""

import pytest

from harness import PROPERTIES, case_id, combination_cases, load_features, run_property, single_cases

load_features()
CASES = single_cases() + combination_cases(count=40, seed=0)


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_property(case, prop):
    run_property(prop, case)
