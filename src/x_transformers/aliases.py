"""Upstream x-transformers keyword names, resolved to ours once, before validation.

Three tables, one place:

- :data:`ALIASES`: an upstream name (or one of our older names) for a feature we have -> our
  keyword, with the value transform where the two spell it differently
  (``attn_one_kv_head=True`` -> ``attn_kv_heads=1``). Giving an alias together with its target,
  or two aliases of one target, is a ``TypeError`` naming both (two values for one keyword, as
  Python says of a function called with one argument twice).
- :data:`NO_OPS`: upstream names that change nothing here (``attn_flash``: our dispatcher always
  picks the kernel; the result is the same function). Any value of the right type is accepted.
- :data:`NOT_YET`: upstream names of features we do not have yet, with upstream's default. At that
  default they are a no-op (an upstream config that spells its defaults out still builds); any
  other value raises, naming the keyword. Nothing is ignored silently.

Names that are the same here and upstream (``rotary_pos_emb``, ``attn_dim_head``, ``ff_glu`` ...)
need no entry: the constructors read them directly. The scope of an entry is where it is passed:
``layers`` (Encoder / Decoder / CrossAttender / AttentionLayers / FunnelEncoder, and either side
of XTransformer with ``enc_`` / ``dec_``) or ``wrapper`` (TransformerWrapper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

DROP = object()  # a transform's answer when the upstream value asks for nothing (the default)


@dataclass(frozen=True)
class Alias:
    name: str  # as a user writes it (prefix included)
    target: str  # our keyword
    transform: Callable[[Any], Any] | None = None  # upstream value -> ours (or DROP); None: the same value
    scope: str = "layers"
    note: str = ""

    def resolve(self, value):
        return value if self.transform is None else self.transform(value)


def _flag(name: str, value_when_on):
    """An upstream bool that selects one value of our keyword: True -> that value, False -> nothing."""
    def transform(value):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        return value_when_on if value else DROP
    return transform


ALIASES: dict[str, Alias] = {a.name: a for a in (
    Alias("attn_one_kv_head", "attn_kv_heads", _flag("attn_one_kv_head", 1),
          note="multi-query attention: one key/value head"),
    Alias("ff_swish", "ff_activation", _flag("ff_swish", "swish"), note="SiLU activation (SwiGLU with ff_glu)"),
    Alias("ff_relu_squared", "ff_activation", _flag("ff_relu_squared", "relu_squared"),
          note="squared ReLU activation, 2109.08668"),
    Alias("cross_attn_dim_context", "dim_context", note="width of the cross-attention context"),
    Alias("tie_embedding_scale", "logits_scale", scope="wrapper",
          note="scale of the tied head's logits (needs tie_embedding=True)"),
    # upstream's Attention takes these; its stack passes them to self-attention itself (a stack given
    # the attn_ name as well fails there): here one keyword, at the level that decides it
    Alias("attn_learned_value_residual_mix", "learned_value_residual_mix",
          note="the value residual's learned per-token mix (with add_value_residual)"),
    Alias("rotate_num_heads", "attn_rotate_num_heads", note="rotary on the last n heads only"),
)}


@dataclass(frozen=True)
class NoOp:
    name: str
    kinds: tuple[type, ...]  # accepted value types
    reason: str
    scope: str = "layers"


NO_OPS: dict[str, NoOp] = {n.name: n for n in (
    NoOp("attn_flash", (bool,), "the attention dispatcher picks the kernel (flash / fused SDPA when it can "
                                "compute the request); the result is the same function either way"),
    NoOp("verbose", (bool,), "upstream's warnings switch; nothing here is logged at construction"),
    NoOp("norm_add_unit_offset", (bool,), "how a norm's gain is stored (upstream: 1 + a zero-initialised "
                                          "parameter); the function is the same, see docs/migration.md"),
)}


# Upstream (2.31.10) names of features we do not have yet -> upstream's default. The issue that
# will add them: #20 attention variants, #21 residual / norm / position / feed-forward variants,
# #17 (this issue) the wrapper's and XTransformer's own variants.
_ATTN_NOT_YET = dict(
    qkv_receive_diff_residuals=False,
    onnxable=False,
    attend_sdp_kwargs=dict(enable_flash=True, enable_math=True, enable_mem_efficient=True), flash_pack_seq=False,
    # upstream's Attention takes the context width too, but through attn_ it would reach self-attention
    # as well; cross_attn_dim_context (an alias of dim_context) is the cross-attention one
    dim_context=None,
)
_FF_NOT_YET: dict = {}
_LAYERS_NOT_YET: dict = {}
_WRAPPER_NOT_YET: dict = {}
# XTransformer's own upstream keywords: its forward returns a loss upstream (these configure it)
_XTRANSFORMER_NOT_YET: dict = {}


@dataclass(frozen=True)
class NotYet:
    name: str
    default: Any
    issue: int
    scope: str = "layers"


NOT_YET: dict[tuple[str, str], NotYet] = {}
for _names, _prefix, _issue, _scope in ((_ATTN_NOT_YET, "attn_", 20, "layers"), (_FF_NOT_YET, "ff_", 21, "layers"),
                                        (_LAYERS_NOT_YET, "", 21, "layers"), (_WRAPPER_NOT_YET, "", 17, "wrapper"),
                                        (_XTRANSFORMER_NOT_YET, "", 17, "xtransformer")):
    for _name, _default in _names.items():
        NOT_YET[(_scope, _prefix + _name)] = NotYet(_prefix + _name, _default, _issue, _scope)


def _is_default(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool) and value == default
    if default is None:
        return value is None
    try:
        return type(value) in (int, float, dict) and value == default
    except Exception:  # a tensor or module compares elementwise
        return False


def upstream_names(scope: str) -> set[str]:
    """Every name these tables accept in ``scope``."""
    return ({a.name for a in ALIASES.values() if a.scope == scope}
            | {n.name for n in NO_OPS.values() if n.scope == scope}
            | {e.name for (s, _), e in NOT_YET.items() if s == scope})


def resolve(kwargs: dict[str, Any], scope: str | tuple[str, ...], where: str, prefix: str = "") -> dict[str, Any]:
    """``kwargs`` with every upstream name replaced by ours (or dropped when it asks for nothing).

    Raises TypeError when an alias and its target (or two aliases of one target) are
    both given, ValueError when a not-yet-implemented feature is asked for. ``prefix`` (``enc_`` /
    ``dec_``) is how the caller's user spelled these keywords, for the messages.
    """
    scopes = (scope,) if isinstance(scope, str) else scope
    out, source = {}, {}  # source: our key -> the name the user wrote
    for key, value in kwargs.items():
        alias, noop = ALIASES.get(key), NO_OPS.get(key)
        later = next((NOT_YET[(s, key)] for s in scopes if (s, key) in NOT_YET), None)
        if alias is not None and alias.scope in scopes:
            resolved = alias.resolve(value)
            target = alias.target
        elif noop is not None and noop.scope in scopes:
            if not isinstance(value, noop.kinds):
                kinds = " or ".join(k.__name__ for k in noop.kinds)
                raise ValueError(f"{prefix}{key} must be {kinds}, got {value!r} ({type(value).__name__})")
            continue
        elif later is not None:
            if not _is_default(value, later.default):
                raise ValueError(f"{where}: {prefix}{key}={value!r} asks for an upstream x-transformers feature "
                                 f"that is not implemented here yet (issue #{later.issue}); only its default "
                                 f"{later.default!r} is accepted")
            continue
        else:
            resolved, target = value, key
        if target in source:
            raise TypeError(f"{where} got {prefix}{source[target]} and {prefix}{key}, two values for "
                            f"{prefix}{target}; give one of them")
        if resolved is DROP:  # the upstream value asks for nothing (its default)
            continue
        source[target] = key
        out[target] = resolved
    return out
