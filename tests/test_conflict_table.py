"""The conflict table is one declared table: every entry is declared in the conflicts package
(its data modules), none from the modules whose keywords it names."""

import ast
import pathlib

import x_transformers
from x_transformers import conflicts, heads

SRC = pathlib.Path(x_transformers.__file__).parent


def test_entries_are_declared_only_in_the_conflicts_package():
    declaring = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "conflicts":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "declare":
                declaring.append(f"{path.name}:{node.lineno}")
    assert not declaring, f"conflict entries declared outside the conflicts package: {declaring}"


def test_pooling_alternatives_are_the_heads_modules():
    assert conflicts.POOLING == heads.POOLING
    declared = {frozenset(c.keys) for c in conflicts.CONFLICTS}
    for i, a in enumerate(heads.POOLING):
        for b in heads.POOLING[i + 1:]:
            assert frozenset((a, b)) in declared
