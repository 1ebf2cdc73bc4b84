"""Every combination of keywords the library refuses, declared once, as data.

Each :class:`Conflict` names the keywords as a user writes them (``"attn_shared_qk"``,
``"pre_norm=False"``), the model kinds it applies to, a predicate over the keywords a constructor
received, a keyword set that triggers it (the tests build every entry from it, on every kind
it names, and expect the refusal), and the reason. Constructors call :func:`check` once, before
any module is built; the raised :class:`~x_transformers.config.ConfigConflictError` carries the
entry (``error.conflict``), so a test can tell a declared refusal from an accident.

Model kinds: ``decoder``, ``encoder``, ``cross`` (CrossAttender), ``funnel`` (FunnelEncoder),
``xtransformer`` (both sides of the encoder-decoder and its own keywords), ``wrapper``
(TransformerWrapper's keywords over any stack).

The settings a predicate reads are the user's keywords, plain or prefixed exactly as passed
(``s.get("attn_kv_heads")``); a keyword left out reads as its default through :func:`on`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .config import ConfigConflictError

KINDS = ("decoder", "encoder", "cross", "funnel", "xtransformer", "wrapper")
STACK_KINDS = ("decoder", "encoder", "cross", "funnel", "xtransformer")


def on(s: dict, key: str) -> bool:
    """Whether a keyword is switched on: given, not None, not False / 0."""
    value = s.get(key)
    return value is not None and value is not False and value != 0


@dataclass(frozen=True)
class Conflict:
    keys: tuple[str, ...]  # as the user writes them; "name=value" for a non-default value that conflicts
    when: Callable[[dict], bool]  # over the keywords the constructor received
    reason: str  # why, and what to do instead
    example: dict  # keywords that trigger it (with the kinds' required ones supplied by the caller)
    kinds: tuple[str, ...] = STACK_KINDS

    def message(self, kind: str) -> str:
        return f"{' cannot be combined with '.join(self.keys)} ({kind}): {self.reason}"


CONFLICTS: list[Conflict] = []


def declare(*keys: str, when, reason: str, example: dict, kinds=STACK_KINDS) -> Conflict:
    entry = Conflict(tuple(keys), when, reason, dict(example), tuple(kinds))
    CONFLICTS.append(entry)
    return entry


def check(kind: str, settings: dict) -> None:
    """Raise ConfigConflictError for the first declared conflict among ``settings`` on ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {KINDS}")
    for entry in CONFLICTS:
        if kind in entry.kinds and entry.when(settings):
            error = ConfigConflictError(entry.message(kind))
            error.conflict = entry
            raise error


# ----------------------------------------------------------------------------------------------
# the table (one entry per refusal; keep the reason actionable)

declare("attn_shared_qk", "attn_kv_heads", when=lambda s: on(s, "attn_shared_qk") and on(s, "attn_kv_heads"),
        reason="shared-QK keys are the queries themselves, one per query head",
        example=dict(attn_shared_qk=True, attn_kv_heads=2))
