"""The property harness's cases: every feature alone on every kind it supports, plus a
deterministic pairwise covering array per kind (harness.py holds the features, building, the
properties and the failure reports; the pair accounting goes to ``harness.COVERAGE``)."""

from __future__ import annotations

import itertools
from collections import Counter

import harness
from harness import FEATURES, KINDS, KNOWN_DEFECTS, SameKeyword, declared_refusal


def single_cases():
    return [(kind, (f,)) for f in FEATURES.values() for kind in f.kinds]


def _known_refusals(kind):
    return [frozenset(n for n in key.split("-", 1)[1].split("+")) for key in KNOWN_DEFECTS
            if key.startswith((f"build:{kind}-", "build:*-"))]


def _compatible(kind, feats, known) -> bool:
    """Mutually compatible: distinct groups, no keyword set twice, no declared refusal, no known
    undeclared refusal among them."""
    groups = [f.group for f in feats if f.group]
    if len(groups) != len(set(groups)):
        return False
    try:
        if declared_refusal(kind, feats) is not None:
            return False
    except SameKeyword:
        return False
    names = {f.name for f in feats}
    return not any(k <= names for k in known)


def covering_rows(kind: str, max_size: int = 6):
    """A deterministic greedy pairwise covering array over the features supporting ``kind``: each
    row a set of mutually compatible features covering as many uncovered pairs as it can. Records
    the pair accounting in COVERAGE[kind]."""
    feats = sorted((f for f in FEATURES.values() if kind in f.kinds and f.name != "plain"), key=lambda f: f.name)
    known = _known_refusals(kind)
    uncovered, acct = set(), Counter()
    for a, b in itertools.combinations(feats, 2):
        acct["pairs"] += 1
        if a.group and a.group == b.group:
            acct["alternatives (same group)"] += 1
            continue
        try:
            entry = declared_refusal(kind, (a, b))
        except SameKeyword:
            acct["same keyword"] += 1
            continue
        if entry is not None:
            acct["declared conflicts"] += 1
        elif any(k <= {a.name, b.name} for k in known):
            acct["known undeclared refusals"] += 1
        else:
            uncovered.add((a.name, b.name))
    acct["coverable"] = len(uncovered)
    rows = []
    while uncovered:
        first = min(uncovered)  # deterministic seed pair
        row = [FEATURES[first[0]], FEATURES[first[1]]]
        if not _compatible(kind, row, known):  # a pair refused only with the kind's implied keywords
            uncovered.discard(first)
            acct["refused in a row"] += 1
            continue
        while len(row) < max_size:
            names = {f.name for f in row}
            best, gain = None, 0
            for f in feats:
                if f.name in names:
                    continue
                g = sum(1 for r in row if tuple(sorted((r.name, f.name))) in uncovered)
                if g > gain and _compatible(kind, row + [f], known):
                    best, gain = f, g
            if best is None:
                break
            row.append(best)
        for a, b in itertools.combinations(row, 2):
            uncovered.discard(tuple(sorted((a.name, b.name))))
        rows.append((kind, tuple(sorted(row, key=lambda f: f.name))))
    acct["rows"] = len(rows)
    acct["covered"] = acct["coverable"] - acct["refused in a row"]
    harness.COVERAGE[kind] = dict(acct)
    return rows


def combination_cases(max_size: int = 8):
    return [row for kind in KINDS for row in covering_rows(kind, max_size)]
