"""The keyword validators every config and wrapper shares: unknown names (with the closest valid
one), bool / number types read from the dataclass annotations, positive ints and numbers,
and probabilities. Each raises one line naming the keyword.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Any


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def unknown_keyword(name: str, valid, where: str) -> TypeError:
    return TypeError(f"{where} got an unknown keyword {name!r}{_closest(name, valid)}")


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def build(cls, kwargs: dict[str, Any], where: str, prefix: str = ""):
    """Construct ``cls`` from ``kwargs``, raising TypeError with the closest name for unknown keys."""
    names = field_names(cls)
    for key in kwargs:
        if key not in names:
            raise unknown_keyword(prefix + key, [prefix + n for n in names], where)
    return cls(**kwargs)


def _positive_int(name: str, value, allow_none=False, allow_zero=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _values(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _field_kinds(f) -> set[str]:
    return set(str(f.type).replace(" ", "").split("|"))


def check_types(cls, kwargs: dict[str, Any], prefix: str = ""):
    """A bool keyword must be a real bool, a number a real int / float (never a bool or a string):
    ``rotary_pos_emb="no"`` would otherwise switch rotary on. Reads the dataclass annotations."""
    by_name = {f.name: f for f in fields(cls)}
    for key, value in kwargs.items():
        f = by_name.get(key)
        if f is None or value is None and "None" in _field_kinds(f):
            continue
        kinds, name = _field_kinds(f), prefix + key
        if {"bool", "float"} <= kinds:  # a switch or a number (upstream's scale_residual=True / 0.5)
            if not isinstance(value, (bool, int, float)):
                raise ValueError(f"{name} must be True, False or a number, got {value!r} ({type(value).__name__})")
            continue
        if "bool" in kinds and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        if "int" in kinds and "float" not in kinds and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        if "float" in kinds and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
        if kinds == {"str"} and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r} ({type(value).__name__})")


def _positive_number(name: str, value):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _probability(name: str, value):
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
