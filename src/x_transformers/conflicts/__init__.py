"""Every combination of keywords the library refuses, declared once, as data: the conflict table.

The table's entries live in this package's three data modules, by the keywords they name:
``attention.py`` (``attn_`` keywords), ``layers.py`` (norms, residuals, feed-forwards, layout,
positions) and ``wrapper.py`` (TransformerWrapper, XTransformer and pooling keywords). This module
holds the machinery (:class:`Conflict`, :func:`declare`, :func:`check`, the predicates' helpers) and
loads the three; nothing outside the package declares an entry.

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

from dataclasses import dataclass, field  # noqa: F401 - field: the table's modules may read it
from typing import Callable

from ..config import ADAPTIVE, SCORE_FEATURES, ConfigConflictError  # noqa: F401 - the table's modules read them

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


def off(s: dict, key: str) -> bool:
    """Whether a keyword whose default is True was given as False (``pre_norm=False``)."""
    return s.get(key, True) is False


def depths(s: dict) -> tuple:
    """The funnel's depths the keywords ask for (``depths``, default as the funnel's)."""
    from ..funnel import DEFAULT_DEPTHS  # the funnel imports the layers, which import this table

    d = s.get("depths", DEFAULT_DEPTHS)
    return tuple(d) if hasattr(d, "__len__") else (d,)


def blocks(s: dict) -> int:
    """How many funnel blocks the keywords ask for."""
    return len(depths(s))


def side(s: dict, prefix: str, key: str):
    """An XTransformer keyword as one side sees it: ``enc_key`` / ``dec_key`` over the shared ``key``."""
    return s.get(f"{prefix}_{key}", s.get(key))


def head_counts(s: dict) -> set:
    """The head counts the keywords give: ``heads`` (default 8), or per side of an XTransformer."""
    return {side(s, "enc", "heads") or 8, side(s, "dec", "heads") or 8}


def forced(s: dict) -> bool:
    """attn_backend names one backend (not "auto", not the explicit one that computes everything)."""
    return s.get("attn_backend", "auto") not in ("auto", "explicit")


WRAPPER = ("wrapper",)
XT = ("xtransformer",)
ENTMAX = ("attn_use_entmax15", "attn_entmax_alpha", "attn_learned_entmax_alpha")
EXAMPLE_ON = {"attn_use_entmax15": True, "attn_entmax_alpha": 1.5, "attn_learned_entmax_alpha": True,
              "attn_talking_heads": True, "attn_pre_talking_heads": True, "attn_post_talking_heads": True,
              "attn_sparse_topk": 2, "attn_sigmoid": True, "attn_cog_signed": True, "attn_l2_distance": True,
              "attn_hard": True, "attn_gumbel_softmax": True, "attn_selective": True, "attn_inverted_attention": True,
              "attn_pre_scale_post_talking_heads": True, "attn_head_learned_sink": True, "attn_use_cope": True,
              "attn_custom_attn_fn": lambda scores: scores.softmax(dim=-1)}


# the table: its entries are declared when these modules load (in this order: the order of CONFLICTS)
from . import attention, layers, wrapper  # noqa: E402,F401
from .wrapper import POOLING  # noqa: E402,F401
