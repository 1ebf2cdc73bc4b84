"""The property harness over every registered feature alone and a pairwise covering array of
combinations (see harness.py for the coverage rule)."""

import pytest

from harness import (FEATURES, KINDS, KNOWN_DEFECTS, PROPERTIES, case_id, check_case, declared_refusal, defect_key, fails,
                     known_defect, load_features, parse_defect_key)
from harness_cases import combination_cases, single_cases

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


def test_known_defects_still_fail():
    """Each known defect must still fail; when its fix lands, remove its KNOWN_DEFECTS entry (the list
    is empty when every defect is fixed: nothing then to check)."""
    for key in sorted(KNOWN_DEFECTS):
        prop, (kind, feats) = parse_defect_key(key)
        kinds = [kind] if kind != "*" else [k for k in KINDS if all(k in f.kinds for f in feats)]
        for k in kinds:
            assert fails(prop, (k, feats)) is not None, f"{key} passes on {k} now: update harness.KNOWN_DEFECTS"


def test_every_feature_is_in_a_row_on_every_kind_it_supports():
    """Unless refused alone on that kind (a declared or a known undeclared refusal)."""
    for kind in KINDS:
        in_rows = {f.name for k, feats in ROWS if k == kind for f in feats}
        for f in FEATURES.values():
            if kind not in f.kinds or f.name == "plain" or f.name in in_rows:
                continue
            alone = declared_refusal(kind, (f,)) is not None or known_defect(defect_key("build", (kind, (f,))))
            assert alone, f"{f.name} is in no covering-array row on {kind}"
