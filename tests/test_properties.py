"""The property harness over every registered feature alone and a pairwise covering array of
combinations (see harness.py for the coverage rule)."""

import pytest

from harness import (FEATURES, KNOWN_DEFECTS, PROPERTIES, case_id, check_case, combination_cases, fails,
                     load_features, parse_defect_key, single_cases)

load_features()
SINGLES = single_cases()
ROWS = combination_cases()


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("case", SINGLES, ids=case_id)
def test_single(case, prop):
    check_case(prop, case)


@pytest.mark.parametrize("prop", list(PROPERTIES))
@pytest.mark.parametrize("case", ROWS, ids=case_id)
def test_pairwise(case, prop):
    check_case(prop, case)


@pytest.mark.parametrize("key", sorted(KNOWN_DEFECTS))
def test_known_defect_still_fails(key):
    """Each known defect must still fail; when its fix lands, remove its KNOWN_DEFECTS entry."""
    prop, case = parse_defect_key(key)
    assert fails(prop, case) is not None, f"{key} passes now: remove it from harness.KNOWN_DEFECTS"


def test_every_feature_is_in_a_row_on_every_kind_it_supports():
    for kind in {k for f in FEATURES.values() for k in f.kinds}:
        in_rows = {f.name for k, feats in ROWS if k == kind for f in feats}
        wanted = {f.name for f in FEATURES.values() if kind in f.kinds and f.name != "plain"}
        # a feature refused with every partner still runs alone (test_single)
        assert len(in_rows) >= len(wanted) - 3, (kind, sorted(wanted - in_rows))
