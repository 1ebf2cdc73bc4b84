"""Keyword API outside, validated frozen dataclasses inside.

The public constructors take the keywords this field knows (``Decoder(dim=512, depth=6,
heads=8, rotary_pos_emb=True, attn_kv_heads=4)``). They are parsed once here: ``attn_*``
keywords go to :class:`AttentionConfig`, ``ff_*`` to :class:`FeedForwardConfig`, the rest to
:class:`LayersConfig`. An unknown keyword raises ``TypeError`` naming the closest valid one; an
impossible value raises ``ValueError`` saying what to change; two keywords that cannot work
together raise :class:`ConfigConflictError` naming both.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any


class ConfigConflictError(ValueError):
    """Two keywords that cannot be combined. The message names both and says why."""


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


def conflict(a: str, b: str, why: str) -> ConfigConflictError:
    return ConfigConflictError(f"{a} cannot be combined with {b}: {why}")


def _positive_int(name: str, value, allow_none=False, allow_zero=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _probability(name: str, value):
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")


ENTMAX_MIN_GAP = 1e-3  # alpha >= 1 + this: entmax_bisect is inaccurate nearer 1 and uniform at 1


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    """Options of one attention block; the keywords are these names with an ``attn_`` prefix."""

    dim_head: int | None = None  # free head dimension, 2002.07028
    kv_heads: int | None = None  # grouped / multi-query key-value heads, 2305.13245, 1911.02150
    dropout: float = 0.0
    bias: bool = False  # bias on the q/k/v and output projections (GPT-2 has them)
    scale: float | None = None  # logit scale; default dim_head ** -0.5
    num_mem_kv: int = 0  # persistent memory key/values, 1907.01470
    talking_heads: bool = False  # both pre- and post-softmax head mixing, 2003.02436
    pre_talking_heads: bool = False
    post_talking_heads: bool = False
    use_entmax15: bool = False  # adaptively sparse attention, 1909.00015
    entmax_alpha: float | None = None
    learned_entmax_alpha: bool = False
    sparse_topk: int | None = None  # explicit sparse attention, 1912.11637
    shared_qk: bool = False  # Reformer, 2001.04451
    qk_norm: bool = False  # query-key normalisation, 2010.04245
    qk_norm_scale: float = 10.0
    backend: str = "auto"  # "auto", or force one of attend.BACKENDS

    def __post_init__(self):
        _positive_int("attn_dim_head", self.dim_head, allow_none=True)
        _positive_int("attn_kv_heads", self.kv_heads, allow_none=True)
        _positive_int("attn_num_mem_kv", self.num_mem_kv, allow_zero=True)
        _positive_int("attn_sparse_topk", self.sparse_topk, allow_none=True)
        _probability("attn_dropout", self.dropout)
        if self.entmax_alpha is not None and not (1.0 + ENTMAX_MIN_GAP <= self.entmax_alpha <= 2.0):
            raise ValueError(f"attn_entmax_alpha must lie in [1 + {ENTMAX_MIN_GAP}, 2] (closer to 1 the bisection "
                             f"loses precision: leave it unset for softmax), got {self.entmax_alpha!r}")
        sparse = [n for n, on in (("attn_use_entmax15", self.use_entmax15),
                                  ("attn_entmax_alpha", self.entmax_alpha is not None),
                                  ("attn_learned_entmax_alpha", self.learned_entmax_alpha)) if on]
        if len(sparse) > 1:
            raise conflict(sparse[0], sparse[1], "choose one entmax variant")
        if sparse and self.sparse_topk is not None:
            raise conflict(sparse[0], "attn_sparse_topk", "top-k sparsity is defined on softmax attention")
        if self.shared_qk and self.kv_heads is not None:
            raise conflict("attn_shared_qk", "attn_kv_heads", "shared-QK keys are the queries themselves, one per query head")
        if not (isinstance(self.qk_norm_scale, (int, float)) and self.qk_norm_scale > 0):
            raise ValueError(f"attn_qk_norm_scale must be positive, got {self.qk_norm_scale!r}")
        if self.qk_norm and self.scale is not None:
            raise conflict("attn_qk_norm", "attn_scale", "QK-norm learns its own logit scale (set attn_qk_norm_scale)")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"attn_scale must be positive, got {self.scale!r}")

    @property
    def pre_mix(self) -> bool:
        return self.talking_heads or self.pre_talking_heads

    @property
    def post_mix(self) -> bool:
        return self.talking_heads or self.post_talking_heads

    @property
    def needs_scores(self) -> bool:
        """Features that need the full score matrix, so only the explicit backend computes them."""
        return (self.pre_mix or self.post_mix or self.use_entmax15 or self.entmax_alpha is not None
                or self.learned_entmax_alpha or self.sparse_topk is not None)


@dataclass(frozen=True, kw_only=True)
class FeedForwardConfig:
    """Options of one feed-forward block; the keywords are these names with an ``ff_`` prefix."""

    mult: float = 4
    inner_dim: int | None = None  # overrides mult (Llama sizes it freely)
    glu: bool = False  # GLU variants, 2002.05202
    activation: str = "gelu"
    no_bias: bool = False
    dropout: float = 0.0
    chunks: int = 1  # Reformer's chunked feed-forward

    def __post_init__(self):
        from .feedforward import ACTIVATIONS  # registry lives beside its users

        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ff_activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not self.mult > 0:
            raise ValueError(f"ff_mult must be positive, got {self.mult!r}")
        _positive_int("ff_inner_dim", self.inner_dim, allow_none=True)
        _positive_int("ff_chunks", self.chunks)
        _probability("ff_dropout", self.dropout)


@dataclass(frozen=True, kw_only=True)
class LayersConfig:
    """Options of a stack of layers (``Encoder`` / ``Decoder`` / ``CrossAttender``)."""

    dim: int
    depth: int
    heads: int = 8
    causal: bool = False
    cross_attend: bool = False
    only_cross: bool = False
    dim_context: int | None = None
    # norms and residuals
    pre_norm: bool = True
    sandwich_norm: bool = False  # 2105.13290
    use_scalenorm: bool = False  # 1910.05895
    use_rmsnorm: bool = False  # 1910.07467
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm's additive bias
    use_rezero: bool = False  # 2003.04887
    layer_dropout: float = 0.0
    # layer layout
    macaron: bool = False  # 1906.02762
    sandwich_coef: int | None = None  # 1911.03864
    custom_layers: tuple[str, ...] | None = None
    top_attn_to_ff: int = 0  # the top n layers' self-attention becomes a feed-forward, 2005.13895
    reversible: bool = False  # two-stream reversible coupling, recomputed in backward, 2001.04451
    # positions
    rotary_pos_emb: bool = False  # 2104.09864
    rotary_emb_dim: int | None = None
    rotary_base: float = 10000.0
    alibi_pos_bias: bool = False  # 2108.12409
    alibi_num_heads: int | None = None
    rel_pos_bias: bool = False  # T5, 1910.10683
    rel_pos_num_buckets: int = 32
    rel_pos_max_distance: int = 128
    tupe: bool = False  # untied positional correlation, TUPE, 2006.15595
    tupe_max_seq_len: int | None = None  # size of TUPE's learned position table (required with tupe)
    tupe_untie_cls: bool = False  # TUPE's untied [CLS]: position 0 gets learned scores, not positional ones

    def __post_init__(self):
        _positive_int("dim", self.dim)
        _positive_int("depth", self.depth)
        _positive_int("heads", self.heads)
        _positive_int("dim_context", self.dim_context, allow_none=True)
        _probability("layer_dropout", self.layer_dropout)
        norms = [n for n, on in (("use_scalenorm", self.use_scalenorm), ("use_rmsnorm", self.use_rmsnorm)) if on]
        if len(norms) > 1:
            raise conflict(norms[0], norms[1], "choose one norm")
        if self.use_rezero and (self.sandwich_norm or not self.pre_norm):
            other = "sandwich_norm" if self.sandwich_norm else "pre_norm=False"
            raise conflict("use_rezero", other, "ReZero removes the norms around residual branches")
        if self.only_cross and self.causal:
            raise conflict("only_cross", "causal", "a cross-attention-only stack has no self-attention to make causal")
        if self.custom_layers is not None:
            if isinstance(self.custom_layers, str) or not all(c in ("a", "c", "f") for c in self.custom_layers):
                raise ValueError(f"custom_layers must be a sequence of 'a', 'c', 'f', got {self.custom_layers!r}")
            if self.sandwich_coef is not None or self.macaron:
                raise conflict("custom_layers", "sandwich_coef" if self.sandwich_coef is not None else "macaron",
                               "custom_layers already fixes the whole layout")
        if self.sandwich_coef is not None:
            _positive_int("sandwich_coef", self.sandwich_coef)
            if self.sandwich_coef > self.depth:
                raise ValueError(f"sandwich_coef ({self.sandwich_coef}) must be at most depth ({self.depth})")
            if self.macaron:
                raise conflict("sandwich_coef", "macaron", "both define the layer order")
        _positive_int("top_attn_to_ff", self.top_attn_to_ff, allow_zero=True)
        if self.top_attn_to_ff:
            if self.top_attn_to_ff > self.depth:
                raise ValueError(f"top_attn_to_ff ({self.top_attn_to_ff}) must be at most depth ({self.depth})")
            for other, on, why in (
                ("only_cross", self.only_cross, "a cross-attention-only stack has no self-attention to replace"),
                ("custom_layers", self.custom_layers is not None, "custom_layers already fixes the whole layout"),
                ("sandwich_coef", self.sandwich_coef is not None, "a sandwich layout has no per-layer (a, f) pairs"),
            ):
                if on:
                    raise conflict("top_attn_to_ff", other, why)
        if self.reversible and not self.pre_norm:
            raise conflict("reversible", "pre_norm=False", "post-norm normalises the sum x + f(x), which is not an "
                           "additive coupling and cannot be inverted")
        biases = [n for n, on in (("alibi_pos_bias", self.alibi_pos_bias), ("rel_pos_bias", self.rel_pos_bias)) if on]
        if len(biases) > 1:
            raise conflict(biases[0], biases[1], "choose one relative position bias")
        if self.rotary_emb_dim is not None:
            _positive_int("rotary_emb_dim", self.rotary_emb_dim)
            if self.rotary_emb_dim % 2:
                raise ValueError(f"rotary_emb_dim must be even, got {self.rotary_emb_dim}")
        if self.alibi_num_heads is not None:
            _positive_int("alibi_num_heads", self.alibi_num_heads)
            if self.alibi_num_heads > self.heads:
                raise ValueError(f"alibi_num_heads ({self.alibi_num_heads}) must be at most heads ({self.heads})")
        _positive_int("rel_pos_num_buckets", self.rel_pos_num_buckets)
        _positive_int("rel_pos_max_distance", self.rel_pos_max_distance)
        self._check_tupe()

    def _check_tupe(self):
        if not self.tupe:
            for sub, on in (("tupe_max_seq_len", self.tupe_max_seq_len is not None), ("tupe_untie_cls", self.tupe_untie_cls)):
                if on:
                    raise ValueError(f"{sub} configures TUPE; set tupe=True as well")
            return
        if self.tupe_max_seq_len is None:
            raise ValueError("tupe=True needs tupe_max_seq_len, the length of its learned position table")
        _positive_int("tupe_max_seq_len", self.tupe_max_seq_len)
        # TUPE-R (TUPE + T5 bias, the paper's eq. 11) is supported; these two are not:
        if self.rotary_pos_emb:
            raise conflict("tupe", "rotary_pos_emb", "TUPE keeps position out of the word-to-word term, which rotary "
                           "rotates by position; use rel_pos_bias=True for TUPE-R")
        if self.alibi_pos_bias:
            raise conflict("tupe", "alibi_pos_bias", "ALiBi exists to extrapolate past the training length, which "
                           "TUPE's learned position table forbids; use rel_pos_bias=True for TUPE-R")

    @property
    def has_relative_positions(self) -> bool:
        return self.rotary_pos_emb or self.alibi_pos_bias or self.rel_pos_bias

    @property
    def has_positions(self) -> bool:
        """The stack itself carries position (relative schemes or TUPE): no absolute embedding needed."""
        return self.has_relative_positions or self.tupe


def split_layer_kwargs(kwargs: dict[str, Any], where: str) -> tuple[dict, dict, dict]:
    """Route keywords: exact LayersConfig names first, then ``attn_`` and ``ff_`` prefixes."""
    layer_names = field_names(LayersConfig)
    attn_names, ff_names = field_names(AttentionConfig), field_names(FeedForwardConfig)
    layers, attn, ff = {}, {}, {}
    for key, value in kwargs.items():
        if key in layer_names:
            layers[key] = value
        elif key.startswith("attn_") and key[5:] in attn_names:
            attn[key[5:]] = value
        elif key.startswith("ff_") and key[3:] in ff_names:
            ff[key[3:]] = value
        else:
            valid = list(layer_names) + ["attn_" + n for n in attn_names] + ["ff_" + n for n in ff_names]
            raise unknown_keyword(key, valid, where)
    return layers, attn, ff
