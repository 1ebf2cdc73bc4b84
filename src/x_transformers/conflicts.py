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


# ----------------------------------------------------------------------------------------------
# funnel / reversible (runner)
#
# The funnel's blocks are Encoders run by the shared block runner (blocks.py), so every Encoder
# keyword (TUPE, reversible, ...) is honoured in a funnel; what is refused is what query pooling
# itself cannot do. FunnelEncoder passes its keywords with ``depths`` always set.


def _pools(s: dict) -> bool:
    return len(tuple(s.get("depths", ()))) > 1


declare("attn_shared_qk", "depths", when=lambda s: on(s, "attn_shared_qk") and _pools(s),
        reason="pooled queries have no keys of their own to share (use a single block, depths=(n,), for shared-QK)",
        example=dict(attn_shared_qk=True, depths=(1, 1)), kinds=("funnel",))
declare("upsample_depth", "upsample=False", when=lambda s: s.get("upsample_depth") is not None and not on(s, "upsample"),
        reason="the decoder exists only with upsample=True",
        example=dict(upsample_depth=3, depths=(1, 1)), kinds=("funnel",))
declare("only_cross", "depths", when=lambda s: on(s, "only_cross") and _pools(s),
        reason="query pooling needs a self-attention layer in every block",
        example=dict(only_cross=True, depths=(1, 1)), kinds=("funnel",))
declare("custom_layers", "depths",
        when=lambda s: s.get("custom_layers") is not None and "a" not in tuple(s["custom_layers"]) and _pools(s),
        reason="query pooling needs a self-attention layer in every block",
        example=dict(custom_layers=("f",), depths=(1, 1)), kinds=("funnel",))
declare("top_attn_to_ff", "depths",
        when=lambda s: on(s, "top_attn_to_ff") and _pools(s) and any(d <= s["top_attn_to_ff"] for d in s["depths"]),
        reason="a block whose every self-attention became a feed-forward cannot take pooled queries; "
               "keep top_attn_to_ff below every block's depth",
        example=dict(top_attn_to_ff=1, depths=(1, 1)), kinds=("funnel",))
