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

from .config import ADAPTIVE, SCORE_FEATURES, ConfigConflictError

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
    from .funnel import DEFAULT_DEPTHS  # the funnel imports the layers, which import this table

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


def self_attention(s: dict) -> bool:
    """Whether some block attends to the sequence itself: the wrapper's settings say so from the
    built layouts (``self_attention``); from keywords alone, a custom layout without 'a' has none."""
    if "self_attention" in s:
        return bool(s["self_attention"])
    layers = s.get("custom_layers")
    return layers is None or "a" in layers


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
              "attn_pre_scale_post_talking_heads": True, "attn_head_learned_sink": True}

# ----------------------------------------------------------------------------------------------
# the table (one entry per refusal; keep the reason actionable)

# attention keywords
# (attn_kv_heads equal to heads is plain multi-head attention: one key per query head, as shared-QK's)
declare("attn_shared_qk", "attn_kv_heads",
        when=lambda s: on(s, "attn_shared_qk") and on(s, "attn_kv_heads") and any(
            s["attn_kv_heads"] != h for h in head_counts(s)),
        reason="shared-QK keys are the queries themselves, one per query head (attn_kv_heads must equal heads)",
        example=dict(attn_shared_qk=True, attn_kv_heads=2))
# (top-k with entmax: the top k scores are kept, then entmax normalises them, as upstream's Attend)
for _i, _a in enumerate(ENTMAX):
    for _b in ENTMAX[_i + 1:]:
        declare(_a, _b, when=lambda s, a=_a, b=_b: on(s, a) and on(s, b), reason="choose one entmax variant",
                example={_a: EXAMPLE_ON[_a], _b: EXAMPLE_ON[_b]})
# (QK-norm with attn_scale: the unit logits times that fixed scale, no learned one: attention.py)
declare("attn_qk_norm_scale", "attn_scale",
        when=lambda s: on(s, "attn_qk_norm") and "attn_qk_norm_scale" in s and s.get("attn_scale") is not None,
        reason="under QK-norm attn_qk_norm_scale starts a learned logit scale and attn_scale fixes one; choose one",
        example=dict(attn_qk_norm=True, attn_qk_norm_scale=10.0, attn_scale=0.5))
# a forced kernel must compute every feature asked of it (config.SCORE_FEATURES need the score matrix)
for _f in SCORE_FEATURES:
    declare("attn_backend", f"attn_{_f}", when=lambda s, f=_f: forced(s) and on(s, f"attn_{f}"),
            reason=f"the forced backend cannot compute attn_{_f}, which needs the full score matrix; "
                   f"use attn_backend='auto' (it falls back) or 'explicit'",
            example={"attn_backend": "sdpa", f"attn_{_f}": EXAMPLE_ON[f"attn_{_f}"]})

# norms and residuals
declare("use_scalenorm", "use_rmsnorm", when=lambda s: on(s, "use_scalenorm") and on(s, "use_rmsnorm"),
        reason="choose one norm", example=dict(use_scalenorm=True, use_rmsnorm=True))
for _n in ("use_scalenorm", "use_rmsnorm"):
    declare(_n, "use_simple_rmsnorm", when=lambda s, n=_n: on(s, n) and on(s, "use_simple_rmsnorm"),
            reason="choose one norm", example={_n: True, "use_simple_rmsnorm": True})
declare("pre_norm_has_final_norm=False", "pre_norm=False",
        when=lambda s: off(s, "pre_norm_has_final_norm") and off(s, "pre_norm"),
        reason="a post-norm stack has no final norm to drop", example=dict(pre_norm_has_final_norm=False, pre_norm=False))
declare("pre_norm_has_final_norm=False", "use_rezero",
        when=lambda s: off(s, "pre_norm_has_final_norm") and on(s, "use_rezero"),
        reason="a ReZero stack has no final norm to drop", example=dict(pre_norm_has_final_norm=False, use_rezero=True))
declare("use_rezero", "sandwich_norm", when=lambda s: on(s, "use_rezero") and on(s, "sandwich_norm"),
        reason="ReZero removes the norms around residual branches", example=dict(use_rezero=True, sandwich_norm=True))
declare("use_rezero", "pre_norm=False", when=lambda s: on(s, "use_rezero") and off(s, "pre_norm"),
        reason="ReZero removes the norms around residual branches", example=dict(use_rezero=True, pre_norm=False))
declare("reversible", "pre_norm=False", when=lambda s: on(s, "reversible") and off(s, "pre_norm"),
        reason="post-norm normalises the sum x + f(x), which is not an additive coupling and cannot be inverted",
        example=dict(reversible=True, pre_norm=False))

# normalisation-free norms (DyT, Derf) replace every norm: one norm family at a time
_NORMS = ("use_scalenorm", "use_rmsnorm", "use_simple_rmsnorm")
for _f in ("use_dynamic_tanh", "use_derf"):
    for _n in _NORMS:
        declare(_n, _f, when=lambda s, n=_n, f=_f: on(s, n) and on(s, f), reason="choose one norm",
                example={_n: True, _f: True})
    declare(_f, "use_rezero", when=lambda s, f=_f: on(s, f) and on(s, "use_rezero"),
            reason="ReZero has no norms for it to replace", example={_f: True, "use_rezero": True})
# adaptive norms (adaptive.py) replace every norm; the funnel and XTransformer forwards take no condition
for _a, _others in (("use_adaptive_layernorm", _NORMS + ("use_dynamic_tanh", "use_derf", "use_adaptive_rmsnorm")),
                    ("use_adaptive_rmsnorm", _NORMS + ("use_dynamic_tanh", "use_derf")), ("use_layerscale", ())):
    for _n in _others + ("use_rezero",) if _a != "use_layerscale" else ("use_adaptive_layerscale",):
        declare(_a, _n, when=lambda s, a=_a, n=_n: on(s, a) and on(s, n), example={_a: True, _n: True},
                reason="choose one norm (ReZero has none to condition)" if _a != "use_layerscale" else "choose one")
for _a in ADAPTIVE:
    declare(_a, "FunnelEncoder / XTransformer", when=lambda s, a=_a: any(on(s, p + a) for p in ("", "enc_", "dec_")),
            reason="their forward takes no condition; use a Decoder / Encoder / CrossAttender under a wrapper",
            example={_a: True}, kinds=("funnel", "xtransformer"))
declare("use_dynamic_tanh", "use_derf", when=lambda s: on(s, "use_dynamic_tanh") and on(s, "use_derf"),
        reason="choose one norm", example=dict(use_dynamic_tanh=True, use_derf=True))
declare("use_dynamic_tanh", "pre_norm=False", when=lambda s: on(s, "use_dynamic_tanh") and off(s, "pre_norm"),
        reason="DyT (2503.10622) replaces pre-norms; as a post-norm it is untested (upstream refuses it too)",
        example=dict(use_dynamic_tanh=True, pre_norm=False))
declare("pre_and_post_norm", "pre_norm=False", when=lambda s: on(s, "pre_and_post_norm") and off(s, "pre_norm"),
        reason="pre_and_post_norm already places a norm before each branch and after each sum",
        example=dict(pre_and_post_norm=True, pre_norm=False))
declare("pre_and_post_norm", "use_rezero", when=lambda s: on(s, "pre_and_post_norm") and on(s, "use_rezero"),
        reason="ReZero removes the norms around residual branches", example=dict(pre_and_post_norm=True, use_rezero=True))
# (branches that start at zero: two zero factors on one branch give neither of them a gradient)
_ZERO = {"use_rezero": lambda s: on(s, "use_rezero"),
         "use_layerscale": lambda s: on(s, "use_layerscale") and s.get("layerscale_init_value", 0.0) == 0,
         "zero_init_branch_output": lambda s: on(s, "zero_init_branch_output"),
         "ff_zero_init_output": lambda s: on(s, "ff_zero_init_output")}
_ZERO_EX = {"use_rezero": dict(use_rezero=True), "use_layerscale": dict(use_layerscale=True),
            "zero_init_branch_output": dict(zero_init_branch_output=True),
            "ff_zero_init_output": dict(ff_zero_init_output=True)}
for _a, _b in (("use_rezero", "use_layerscale"), ("use_rezero", "zero_init_branch_output"),
               ("use_rezero", "ff_zero_init_output"), ("use_layerscale", "zero_init_branch_output"),
               ("use_layerscale", "ff_zero_init_output")):
    declare(_a, _b, when=lambda s, a=_a, b=_b: _ZERO[a](s) and _ZERO[b](s),
            reason="both start the branch at zero, so neither gets a gradient and the branch never opens "
                   "(give layerscale_init_value > 0, or keep one of them)",
            example={**_ZERO_EX[_a], **_ZERO_EX[_b]})
declare("zero_init_branch_output", "depth_scale_residual=True",
        when=lambda s: on(s, "zero_init_branch_output") and s.get("depth_scale_residual") is True,
        reason="both initialise the branch output projections; choose one",
        example=dict(zero_init_branch_output=True, depth_scale_residual=True))
for _k, _ex in (("ff_output_proj_depth", 2), ("ff_zero_init_output", True)):
    declare("depth_scale_residual=True", _k, when=lambda s, k=_k: s.get("depth_scale_residual") is True and on(s, k),
            reason="both initialise the feed-forward output projection; choose one",
            example={"depth_scale_residual": True, _k: _ex})
declare("ff_zero_init_output", "ff_output_proj_depth",
        when=lambda s: on(s, "ff_zero_init_output") and on(s, "ff_output_proj_depth"),
        reason="both initialise the output projection; choose one",
        example=dict(ff_zero_init_output=True, ff_output_proj_depth=2))
# reversible coupling adds each branch to the other stream: the sum must stay a plain, unnormalised x + f(x)
for _k, _ex, _why in (("pre_and_post_norm", True, "a norm after the sum"),
                      ("gate_residual", True, "a GRU in place of the sum"),
                      ("scale_residual=True", True, "a learned gain on the skip path"),
                      ("scale_residual_constant", 0.5, "a constant on the skip path")):
    _name = _k.split("=")[0]
    if _name == "scale_residual":
        _when = lambda s: on(s, "reversible") and s.get("scale_residual") is True
    elif _name == "scale_residual_constant":
        _when = lambda s: on(s, "reversible") and s.get("scale_residual_constant", 1.0) != 1.0
    else:
        _when = lambda s, k=_name: on(s, "reversible") and on(s, k)
    declare("reversible", _k, when=_when,
            reason=f"{_why} makes the layer something other than x + f(x), which the reversible coupling needs",
            example={"reversible": True, _name: _ex})

# residual attention (RealFormer) carries scores from block to block, which a forced fused kernel does not
# produce and the reversible backward (blocks recomputed in reverse order) cannot replay
for _k in ("residual_attn", "cross_residual_attn"):
    declare(_k, "reversible", when=lambda s, k=_k: on(s, k) and on(s, "reversible"), example={_k: True, "reversible": True},
            reason="each attention adds the previous one's scores, which the reversible backward, recomputing "
                   "blocks last to first, does not have")
    declare(_k, "attn_backend", when=lambda s, k=_k: on(s, k) and forced(s), example={_k: True, "attn_backend": "sdpa"},
            reason="the scores are added and passed on, which only the explicit backend computes; use "
                   "attn_backend='auto' (it falls back) or 'explicit'")
# PoPE (polar_pos_emb) rewrites queries and keys into 2 d channels of magnitudes and angles
for _o, _ex, _why in (("rotary_pos_emb", True, "choose one way of putting positions into q and k"),
                      ("tupe", True, "TUPE keeps position out of the word-to-word term, which PoPE puts it into"),
                      ("attn_num_mem_kv", 2, "memory keys have no position and PoPE's width"),
                      ("attn_shared_qk", True, "the keys are the queries, which PoPE transforms differently"),
                      ("attn_kv_heads", 2, "the learned key phase is per query head"),
                      ("only_cross", True, "a cross-attention-only stack has no self-attention for it")):
    declare("polar_pos_emb", _o, when=lambda s, o=_o: on(s, "polar_pos_emb") and on(s, o) and not (
                o == "attn_kv_heads" and s[o] in head_counts(s)), reason=_why,
            example={"polar_pos_emb": True, _o: _ex, **({"tupe_max_seq_len": 16} if _o == "tupe" else {})},
            kinds=("encoder", "cross") if _o == "only_cross" else STACK_KINDS)
declare("polar_pos_emb", "FunnelEncoder", when=lambda s: on(s, "polar_pos_emb"), example=dict(polar_pos_emb=True),
        reason="the funnel's pooled queries read keys at other positions, which PoPE is not given", kinds=("funnel",))
declare("rotary_xpos", "causal=False", when=lambda s: on(s, "rotary_xpos") and not on(s, "causal"),
        reason="xPos scales keys by zeta ** (-position), so keys ahead of a query would grow without bound "
               "(upstream refuses it too); use rotary_pos_emb", example=dict(rotary_xpos=True), kinds=("encoder", "funnel"))

# gated_multi_residual (hyper.py) reads its normalised streams and adds to each: no other skip treatment
for _o, _ex in (("gate_residual", True), ("orthog_residual", True), ("mv_split_residual", True), ("reversible", True),
                ("sandwich_norm", True), ("pre_norm", False), ("scale_residual", True), ("scale_residual_constant", 0.5),
                ("use_rezero", True)):
    declare("gated_multi_residual", "pre_norm=False" if _ex is False else _o, example={"gated_multi_residual": True, _o: _ex,
            "residual_fn_kwargs": {"read_gate_rank": 2}}, reason="its streams are read through their own norm and "
            "written by gates; this keyword would change a skip path or norm it does not have",
            when=lambda s, o=_o, ex=_ex: on(s, "gated_multi_residual") and (
                s.get(o, 1.0) != 1.0 if o == "scale_residual_constant" else s.get(o) is ex))
# hyper-connections (2409.19606) replace the one skip path by s mixed streams
_STREAMS = lambda s: isinstance(s.get("num_residual_streams"), int) and s["num_residual_streams"] > 1
# orthog_residual / mv_split_residual (residual_updates.py) replace the sum x + f, as these do in their own way
for _k in ("orthog_residual", "mv_split_residual"):
    for _o, _ex in (("gate_residual", True), ("num_residual_streams", 2), ("reversible", True),
                    ("mv_split_residual", True))[:4 if _k == "orthog_residual" else 3]:
        declare(_k, _o, when=lambda s, k=_k, o=_o: on(s, k) and (_STREAMS(s) if o == "num_residual_streams" else on(s, o)),
                reason="both replace the plain sum x + f(x) of a residual branch; choose one", example={_k: True, _o: _ex})
for _k, _ex in (("reversible", True), ("gate_residual", True), ("scale_residual", True),
                ("scale_residual_constant", 0.5)):
    _when = (lambda s, k=_k: _STREAMS(s) and s.get(k, 1.0) != 1.0) if _k == "scale_residual_constant" else \
        (lambda s, k=_k: _STREAMS(s) and s.get(k) is True)
    declare("num_residual_streams", _k, when=_when,
            reason="hyper-connections replace the single skip path, which this keyword changes (reversible: the "
                   "two-stream coupling is a residual scheme of its own)",
            example={"num_residual_streams": 2, _k: _ex})

# feed-forward activations: one at a time
for _a, _b, _ex in (("ff_solu", "ff_activation", dict(ff_solu=True, ff_activation="relu")),
                    ("ff_custom_activation", "ff_activation",
                     dict(ff_custom_activation=lambda x: x, ff_activation="relu")),
                    ("ff_custom_activation", "ff_solu", dict(ff_custom_activation=lambda x: x, ff_solu=True))):
    declare(_a, _b, when=lambda s, a=_a, b=_b: on(s, a) and on(s, b) and not (b == "ff_activation" and s[b] == "gelu"),
            reason="choose one activation", example=_ex)

def _glu_clamped(s: dict) -> bool:
    return (on(s, "ff_glu_softclamp") or s.get("ff_glu_gate_softclamp_value", 4.0) != 4.0
            or s.get("ff_glu_up_softclamp_value", 25.0) != 25.0)


for _k, _v in (("ff_solu", True), ("ff_custom_activation", lambda x: x)):
    declare("ff_glu_softclamp", _k, when=lambda s, k=_k: _glu_clamped(s) and on(s, k),
            reason="SiTU-GLU's clamped gate is defined for GELU and swish gates only",
            example={"ff_glu": True, "ff_glu_softclamp": True, _k: _v})

# layout
# (weight tying on a layout that is no repeated unit: one block per kind, shared: layers.py)
for _k, _ex in (("custom_layers", ("a", "f")), ("sandwich_coef", 1), ("macaron", True)):
    declare("par_ratio", _k, when=lambda s, k=_k: on(s, "par_ratio") and on(s, k),
            reason="both define the layer order", example={"par_ratio": 2, _k: _ex})
# U-Net skips pair the units of the default repeated layout
for _k, _ex in (("custom_layers", ("a", "f")), ("sandwich_coef", 1), ("par_ratio", 2), ("top_attn_to_ff", 1),
                ("weight_tie_layers", True), ("layers_execute_order", (0, 1)), ("reversible", True)):
    declare("unet_skips", _k, when=lambda s, k=_k: on(s, "unet_skips") and on(s, k),
            reason="U-Net skips pair the units of the default repeated layout, run once each in order, and add a "
                   "projection of two inputs that no additive (reversible) coupling can invert",
            example={"unet_skips": True, _k: _ex})
def _blocks(s: dict) -> int:
    """How many blocks the layout keywords build (only_attn aside, refused with an order below)."""
    if s.get("custom_layers") is not None:
        return len(s["custom_layers"])
    attn = 1 if on(s, "only_cross") or not on(s, "cross_attend") else 2
    return s.get("depth", 1) * (attn + (2 if on(s, "macaron") else 1))


declare("layers_execute_order", "depth",
        when=lambda s: bool(s.get("layers_execute_order")) and max(s["layers_execute_order"]) >= _blocks(s),
        reason="the order names a block the layout does not have; raise depth or lower the indices",
        example=dict(layers_execute_order=(0, 99)), kinds=("decoder", "encoder", "cross", "xtransformer"))
declare("rotary_base_rescale_factor", "attn_dim_head",
        when=lambda s: s.get("rotary_base_rescale_factor", 1.0) != 1.0 and on(s, "rotary_pos_emb") and (
            s.get("rotary_emb_dim") or max(2, s.get("attn_dim_head", 64) // 2 // 2 * 2)) < 4,
        reason="NTK rescaling needs at least 4 rotated channels (base * factor ** (r / (r - 2)))",
        example=dict(rotary_pos_emb=True, rotary_base_rescale_factor=2.0, attn_dim_head=4))
declare("weight_tie_layers", "layers_execute_order",
        when=lambda s: on(s, "weight_tie_layers") and s.get("layers_execute_order") is not None,
        reason="weight tying is an execution order of its own (one unit, run depth times)",
        example=dict(weight_tie_layers=True, layers_execute_order=(0, 1)))
declare("only_attn", "custom_layers", when=lambda s: on(s, "only_attn") and "f" in (s.get("custom_layers") or ()),
        reason="only_attn drops every feed-forward; leave 'f' out of custom_layers",
        example=dict(only_attn=True, custom_layers=("a", "f")))
declare("only_attn", "top_attn_to_ff", when=lambda s: on(s, "only_attn") and on(s, "top_attn_to_ff"),
        reason="top_attn_to_ff makes feed-forwards, which only_attn drops", example=dict(only_attn=True, top_attn_to_ff=1))
declare("only_attn", "layers_execute_order",
        when=lambda s: on(s, "only_attn") and s.get("layers_execute_order") is not None,
        reason="the block indices would count blocks only_attn removed (upstream refuses it too)",
        example=dict(only_attn=True, layers_execute_order=(0,)))

declare("cross_attn_tokens_dropout", "cross_attend=False",
        when=lambda s: on(s, "cross_attn_tokens_dropout") and not on(s, "cross_attend") and not on(s, "only_cross"),
        reason="it drops context tokens of cross-attention, which this stack does not have; set cross_attend=True",
        example=dict(cross_attn_tokens_dropout=0.25), kinds=("decoder", "encoder", "funnel"))

# layout
declare("only_cross", "causal", when=lambda s: on(s, "only_cross") and on(s, "causal"),
        reason="a cross-attention-only stack has no self-attention to make causal",
        example=dict(only_cross=True, causal=True), kinds=("decoder", "cross", "xtransformer"))
declare("custom_layers", "sandwich_coef", when=lambda s: s.get("custom_layers") is not None and on(s, "sandwich_coef"),
        reason="custom_layers already fixes the whole layout", example=dict(custom_layers=("a", "f"), sandwich_coef=1))
declare("custom_layers", "macaron", when=lambda s: s.get("custom_layers") is not None and on(s, "macaron"),
        reason="custom_layers already fixes the whole layout", example=dict(custom_layers=("a", "f"), macaron=True))
declare("top_attn_to_ff", "only_cross", when=lambda s: on(s, "top_attn_to_ff") and on(s, "only_cross"),
        reason="a cross-attention-only stack has no self-attention to replace",
        example=dict(top_attn_to_ff=1, only_cross=True), kinds=("encoder", "cross", "xtransformer"))
# (top_attn_to_ff on a sandwich or custom layout replaces its last n self-attention blocks: layers.attn_to_ff)

# positions
declare("alibi_pos_bias", "rel_pos_bias", when=lambda s: on(s, "alibi_pos_bias") and on(s, "rel_pos_bias"),
        reason="choose one relative position bias", example=dict(alibi_pos_bias=True, rel_pos_bias=True))
for _p in ("alibi_pos_bias", "rel_pos_bias"):
    declare(_p, "dynamic_pos_bias", when=lambda s, p=_p: on(s, p) and on(s, "dynamic_pos_bias"),
            reason="choose one relative position bias", example={_p: True, "dynamic_pos_bias": True})
# TUPE-R (TUPE + T5 bias, the paper's eq. 11) is supported; these two are not
declare("tupe", "rotary_pos_emb", when=lambda s: on(s, "tupe") and on(s, "rotary_pos_emb"),
        reason="TUPE keeps position out of the word-to-word term, which rotary rotates by position; "
               "use rel_pos_bias=True for TUPE-R",
        example=dict(tupe=True, tupe_max_seq_len=16, rotary_pos_emb=True))
declare("tupe", "alibi_pos_bias", when=lambda s: on(s, "tupe") and on(s, "alibi_pos_bias"),
        reason="ALiBi exists to extrapolate past the training length, which TUPE's learned position table "
               "forbids; use rel_pos_bias=True for TUPE-R",
        example=dict(tupe=True, tupe_max_seq_len=16, alibi_pos_bias=True))

# TransformerWrapper keywords (settings: its own keywords, the stack's resolved LayersConfig
# fields and dim, and a funnel's depths / upsample)
declare("scaled_sinu_pos_emb", "sinusoidal_pos_emb",
        when=lambda s: on(s, "scaled_sinu_pos_emb") and on(s, "sinusoidal_pos_emb"),
        reason="choose one absolute scheme", example=dict(scaled_sinu_pos_emb=True, sinusoidal_pos_emb=True),
        kinds=WRAPPER)
for _p in ("sinusoidal_pos_emb", "scaled_sinu_pos_emb"):
    declare("tupe", _p, when=lambda s, p=_p: on(s, "tupe") and on(s, p),
            reason="TUPE keeps positions out of the token embeddings",
            example={"tupe": True, "tupe_max_seq_len": 16, _p: True}, kinds=WRAPPER)
# (tupe_untie_cls with memory tokens: they share position 0 with the [CLS], the first real token: wrappers.py)
declare("tie_embedding", "emb_dim", when=lambda s: on(s, "tie_embedding") and on(s, "emb_dim")
        and s.get("emb_dim") != s.get("dim"),
        reason="tied logits need emb_dim == dim", example=dict(tie_embedding=True, emb_dim=16), kinds=WRAPPER)
# (memory tokens on a funnel are never pooled: funnel.py)
for _k in ("tie_embedding", "logits_dim", "logits_scale"):
    declare("return_only_embed", _k, when=lambda s, k=_k: on(s, "return_only_embed") and k in s,
            reason="without an output head there are no logits to tie, size or scale",
            example={"return_only_embed": True, _k: {"tie_embedding": True, "logits_dim": 8, "logits_scale": 0.5}[_k]},
            kinds=WRAPPER)

# pooling of the final hidden states and the output head's variants (heads.py)
POOLING = ("use_cls_token", "average_pool_embed", "attn_pool")
for _i, _a in enumerate(POOLING):
    for _b in POOLING[_i + 1:]:
        declare(_a, _b, when=lambda s, a=_a, b=_b: on(s, a) and on(s, b),
                reason="choose one pooling of the final hidden states", example={_a: True, _b: True}, kinds=WRAPPER)
declare("num_output_heads", "tie_embedding", when=lambda s: s.get("num_output_heads", 1) > 1 and on(s, "tie_embedding"),
        reason="a tied head is the one token embedding; untie it for several heads",
        example=dict(num_output_heads=2, tie_embedding=True), kinds=WRAPPER)
declare("num_output_heads", "mixture_of_softmax",
        when=lambda s: s.get("num_output_heads", 1) > 1 and on(s, "mixture_of_softmax"),
        reason="the mixture of softmaxes has one head", example=dict(num_output_heads=2, mixture_of_softmax=True),
        kinds=WRAPPER)
for _k in ("num_output_heads", "mixture_of_softmax", "sigsoftmax_logits", "squeeze_out_last_dim"):
    declare("return_only_embed", _k, when=lambda s, k=_k: on(s, "return_only_embed") and on(s, k)
            and not (k == "num_output_heads" and s[k] == 1),
            reason="without an output head there are no logits to shape",
            example={"return_only_embed": True, _k: 2 if _k == "num_output_heads" else True}, kinds=WRAPPER)

# AlphaFold2's recycling (recurrence.py)
for _k, _v in (("max_mem_len", 4), ("memory_tokens_interspersed_every", 2), ("depths", (1,))):
    declare("recycling", _k, when=lambda s, k=_k: on(s, "recycling") and on(s, k),
            reason="recycling reruns the stack on its own output: one plain sequence in, the same out (no "
                   "segment memories, no interspersed memory columns, no funnel pooling)",
            example={"recycling": True, _k: _v, **({"num_memory_tokens": 1} if _k.startswith("memory") else {})},
            kinds=WRAPPER)

# memory tokens interspersed in the sequence (upstream: decoders only)
declare("memory_tokens_interspersed_every", "num_memory_tokens=0",
        when=lambda s: on(s, "memory_tokens_interspersed_every") and not on(s, "num_memory_tokens"),
        reason="there are no memory tokens to intersperse; set num_memory_tokens",
        example=dict(memory_tokens_interspersed_every=4), kinds=WRAPPER)
declare("memory_tokens_interspersed_every", "tupe_untie_cls",
        when=lambda s: on(s, "memory_tokens_interspersed_every") and on(s, "tupe_untie_cls"),
        reason="memory tokens take the untied [CLS] position 0; interspersed ones would untie positions mid-sequence",
        example=dict(memory_tokens_interspersed_every=4, num_memory_tokens=1, tupe=True, tupe_max_seq_len=16,
                     tupe_untie_cls=True), kinds=WRAPPER)
declare("memory_tokens_interspersed_every", "a bidirectional stack",
        when=lambda s: on(s, "memory_tokens_interspersed_every") and not s.get("causal", False),
        reason="interspersed memory tokens summarise the tokens before them, for a causal stack (Decoder), as "
               "upstream; an encoder reads memory tokens once, at the front",
        example=dict(memory_tokens_interspersed_every=4, num_memory_tokens=1, causal=False), kinds=WRAPPER)

# Transformer-XL memories (max_mem_len, recurrence.py): a causal, sequential stack whose self-attention
# blocks read only the sequence's own hidden states
for _k, _v, _why in (("reversible", True, "the reversible coupling recomputes its blocks without the memory"),
                     ("num_residual_streams", 2, "the memory is one stream of hidden states"),
                     ("shift_tokens", 1, "a shifted token would need the previous segment's features"),
                     ("tupe", True, "TUPE's untied positions index a table; the memory sits at negative positions"),
                     ("num_memory_tokens", 2, "memory tokens would enter every segment's memory; use one or the "
                                              "other")):
    declare("max_mem_len", _k, when=lambda s, k=_k: on(s, "max_mem_len") and on(s, k)
            and not (k == "num_residual_streams" and s[k] == 1),
            reason=_why, example={"max_mem_len": 4, _k: _v, **({"tupe_max_seq_len": 16} if _k == "tupe" else {})},
            kinds=WRAPPER)
declare("max_mem_len", "a bidirectional stack", when=lambda s: on(s, "max_mem_len") and not s.get("causal", False),
        reason="segment recurrence carries a causal stack's (Decoder's) hidden states forward; a bidirectional "
               "stack's outputs change with later tokens", example=dict(max_mem_len=4, causal=False), kinds=WRAPPER)

# per-token feed-forward output scales (ff_deep_embed): one row per token column of a plain stack
for _k, _v in (("num_memory_tokens", 2), ("use_cls_token", True), ("reversible", True), ("num_residual_streams", 2),
               ("depths", (1,)), ("only_attn", True)):
    declare("ff_deep_embed", _k, when=lambda s, k=_k: on(s, "ff_deep_embed") and on(s, k)
            and not (k == "num_residual_streams" and s[k] == 1),
            reason="the deep embedding scales a token's own feed-forward outputs: the stack's columns must be the "
                   "tokens (no memory or [CLS] columns, no funnel), in one stream, run plainly (not reversible), "
                   "with feed-forward blocks",
            example={"ff_deep_embed": True, _k: _v}, kinds=WRAPPER)
declare("add_continuous_pred_head", "emb_dim", when=lambda s: on(s, "add_continuous_pred_head") and on(s, "emb_dim")
        and s.get("emb_dim") != s.get("dim"), reason="the head predicts the input embedding (emb_dim) from hidden "
        "states (dim), upstream's head maps dim to dim", example=dict(add_continuous_pred_head=True, emb_dim=16),
        kinds=WRAPPER)

# a custom token embedding / output head (TransformerWrapper(token_emb=, to_logits=): built modules)
def _module(name):
    """An example module for the entries' examples (the tests build dim=32, num_tokens=10 models)."""
    from torch import nn

    return nn.Embedding(10, 32) if name == "token_emb" else nn.Linear(32, 10)


for _k, _why in (("tie_embedding", "a tied head is the built-in embedding table's weight"),
                 ("l2norm_embed", "the custom embedding replaces the table and its normalisation; normalise in "
                                  "the module")):
    declare("token_emb", _k, when=lambda s, k=_k: on(s, "token_emb") and on(s, k), reason=_why,
            example={"token_emb": _module("token_emb"), _k: True}, kinds=WRAPPER)
for _k, _v, _why in (("tie_embedding", True, "the head is tied to the embedding; untie it for a custom head"),
                     ("num_output_heads", 2, "a custom head is one module; build several inside it"),
                     ("logits_dim", 8, "the custom head's output sets the logits' width"),
                     ("logits_scale", 0.5, "scale inside the custom head"),
                     ("return_only_embed", True, "return_only_embed has no output head")):
    declare("to_logits", _k, when=lambda s, k=_k: on(s, "to_logits") and k in s and s[k] is not None
            and not (k == "num_output_heads" and s[k] == 1) and s[k] is not False,
            reason=_why, example={"to_logits": _module("to_logits"), _k: _v}, kinds=WRAPPER)

# XTransformer keywords (as passed: shared, enc_ and dec_ prefixed)
declare("cross_attend", when=lambda s: on(s, "cross_attend") or on(s, "enc_cross_attend") or off(s, "dec_cross_attend"),
        reason="the decoder of an XTransformer always cross-attends to the encoder, and the encoder has no "
               "context to attend to; drop cross_attend", example=dict(cross_attend=True), kinds=XT)
declare("only_cross", when=lambda s: on(s, "only_cross") or on(s, "enc_only_cross") or on(s, "dec_only_cross"),
        reason="the encoder has no context to cross-attend to, and the decoder is causal self-attention plus "
               "cross-attention; drop only_cross",
        example=dict(only_cross=True), kinds=XT)
declare("custom_layers", "XTransformer", when=lambda s: s.get("custom_layers") is not None,
        reason="one layout cannot serve both sides (the decoder needs 'c' blocks, the encoder cannot have them); "
               "give enc_custom_layers and dec_custom_layers", example=dict(custom_layers=("a", "c", "f")), kinds=XT)
declare("dec_custom_layers", "XTransformer", when=lambda s: s.get("dec_custom_layers") is not None
        and "c" not in s["dec_custom_layers"],
        reason="the decoder needs at least one 'c' (cross-attention) block to read the encoder",
        example=dict(dec_custom_layers=("a", "f")), kinds=XT)
declare("enc_custom_layers", "XTransformer", when=lambda s: s.get("enc_custom_layers") is not None
        and "c" in s["enc_custom_layers"],
        reason="the encoder has no context to cross-attend to; drop its 'c' blocks",
        example=dict(enc_custom_layers=("a", "c", "f")), kinds=XT)
for _k in ("logits_dim", "logits_scale", "return_only_embed"):
    declare(f"enc_{_k}", "XTransformer", when=lambda s, k=_k: f"enc_{k}" in s,
            reason="the encoder of an encoder-decoder has no output head (its hidden states feed the decoder)",
            example={f"enc_{_k}": {"logits_dim": 8, "logits_scale": 0.5, "return_only_embed": True}[_k]}, kinds=XT)
declare("enc_depth", "enc_funnel", when=lambda s: on(s, "enc_funnel") and "enc_depth" in s,
        reason="a funnel encoder takes enc_depths, one depth per block",
        example=dict(enc_funnel=True, enc_depth=2), kinds=XT)
declare("tie_token_emb", "enc_num_tokens / dec_num_tokens",
        when=lambda s: on(s, "tie_token_emb") and (side(s, "enc", "num_tokens") != side(s, "dec", "num_tokens")
                                                   or side(s, "enc", "emb_dim") != side(s, "dec", "emb_dim")),
        reason="both sides need the same vocabulary (and emb_dim) to share one embedding",
        example=dict(tie_token_emb=True, enc_num_tokens=12), kinds=XT)

# ----------------------------------------------------------------------------------------------
# stack and funnel entries: the stack's fire from config.split_layer_kwargs, the funnel's from
# FunnelEncoder (with its depths)

declare("attn_shared_qk", "only_cross", when=lambda s: on(s, "attn_shared_qk") and on(s, "only_cross"),
        reason="shared-QK applies to self-attention; cross-attention keys come from the context",
        example=dict(attn_shared_qk=True, only_cross=True), kinds=("encoder", "cross"))
# (TUPE with attn_scale: attn_scale scales the word-to-word logits instead of TUPE's 1/sqrt(2 * dim_head))
declare("only_cross", "cross_attend", when=lambda s: on(s, "only_cross") and on(s, "cross_attend"),
        reason="only_cross already makes every attention cross-attention",
        example=dict(only_cross=True, cross_attend=True), kinds=("encoder", "cross"))
FUNNEL = ("funnel",)
declare("upsample_depth", "upsample=False", when=lambda s: s.get("upsample_depth") is not None and not on(s, "upsample"),
        reason="the decoder exists only with upsample=True", example=dict(upsample_depth=1), kinds=FUNNEL)
for _p, _ex in (("rel_pos_bias", {}), ("dynamic_pos_bias", {}), ("tupe", {"tupe_max_seq_len": 16})):
    declare(_p, "top_attn_to_ff", "depths",
            when=lambda s, p=_p: on(s, p) and on(s, "top_attn_to_ff") and blocks(s) > 1
            and any(d <= s["top_attn_to_ff"] for d in depths(s)),
            reason="a funnel block whose every self-attention became a feed-forward has no attention scores "
                   "for its own position table to act on; keep top_attn_to_ff below every block's depth",
            example={_p: True, "top_attn_to_ff": 1, "depths": (1, 1), **_ex}, kinds=FUNNEL)
declare("unet_skips", "depth", when=lambda s: on(s, "unet_skips") and isinstance(s.get("depth", 1), int)
        and s.get("depth", 1) < 2,
        reason="U-Net skips join the first half of the layers to the second; one layer has no second half, so "
               "the keyword would do nothing (upstream asserts depth >= 2 as well)",
        example=dict(unet_skips=True, depth=1), kinds=("decoder", "encoder", "cross", "xtransformer"))
declare("unet_skips", "depths", when=lambda s: on(s, "unet_skips") and any(d < 2 for d in depths(s)),
        reason="every funnel block is a stack of its own and needs depth >= 2 for U-Net skips",
        example=dict(unet_skips=True, depths=(1, 2)), kinds=FUNNEL)
declare("layers_execute_order", "FunnelEncoder", when=lambda s: s.get("layers_execute_order") is not None,
        reason="every funnel block is a stack of its own depth, so one order of block indices cannot fit them all",
        example=dict(layers_execute_order=(0, 1)), kinds=FUNNEL)
# (a funnel block without self-attention, from only_cross, custom_layers or top_attn_to_ff, is
# mean-pooled and runs its blocks over the pooled sequence; shared-QK's pooled queries take as keys
# the unit-normalised query projections of the unpooled sequence: funnel.py)

# A cross-attention-only stack (CrossAttender) has no self-attention: the relative position
# schemes act on self-attention scores only, and memory tokens, prepended to the sequence, would
# reach no other position. Refused rather than built and silently ignored.
for _p, _ex in (("rotary_pos_emb", {}), ("alibi_pos_bias", {}), ("rel_pos_bias", {}), ("dynamic_pos_bias", {}),
                ("tupe", {"tupe_max_seq_len": 16})):
    declare(_p, "only_cross", when=lambda s, p=_p: on(s, p) and on(s, "only_cross"),
            reason="a cross-attention-only stack has no self-attention for relative positions to act on; "
                   "give the context its positions before it reaches the CrossAttender",
            example={_p: True, "only_cross": True, **_ex}, kinds=("encoder", "cross"))
declare("shift_tokens", "num_memory_tokens", when=lambda s: on(s, "shift_tokens") and on(s, "num_memory_tokens"),
        reason="memory tokens are prepended to the sequence, so the first token would shift in a memory token's "
               "features, or a left-padded row's padding instead",
        example=dict(shift_tokens=1, num_memory_tokens=2), kinds=WRAPPER)
declare("num_memory_tokens", "only_cross", when=lambda s: on(s, "num_memory_tokens") and on(s, "only_cross"),
        reason="without self-attention, memory tokens reach no other position and learn nothing",
        example=dict(num_memory_tokens=2, only_cross=True), kinds=WRAPPER)
declare("num_memory_tokens", "a layout without self-attention",
        when=lambda s: on(s, "num_memory_tokens") and not on(s, "only_cross") and not self_attention(s),
        reason="no block attends to the sequence itself (custom_layers without 'a', or top_attn_to_ff replacing "
               "every self-attention), so memory tokens reach no other position and learn nothing",
        example=dict(num_memory_tokens=2, custom_layers=("f",)), kinds=WRAPPER)

# attention score modifications (attention_variants in docs/features.md): a forced kernel must
# compute them; the sliding window counts places back along the sequence's own keys
declare("attn_backend='sdpa'", "attn_softclamp_logits",
        when=lambda s: s.get("attn_backend") == "sdpa" and on(s, "attn_softclamp_logits"),
        reason="SDPA takes only an additive bias, and softcapping is tanh of the scores; use attn_backend='auto' "
               "(flex on CUDA, else explicit), 'flex' or 'explicit'",
        example={"attn_backend": "sdpa", "attn_softclamp_logits": True})
declare("attn_backend='flex'", "attn_head_learned_sink",
        when=lambda s: s.get("attn_backend") == "flex" and on(s, "attn_head_learned_sink"),
        reason="the sink is one more softmax column, which flex cannot add; use attn_backend='auto' (SDPA takes "
               "it as a bias column), 'sdpa' or 'explicit'",
        example={"attn_backend": "flex", "attn_head_learned_sink": True})
declare("attn_max_attend_past", "only_cross", when=lambda s: s.get("attn_max_attend_past") is not None
        and on(s, "only_cross"),
        reason="a sliding window counts places back along the sequence's own keys, and a cross-attention-only "
               "stack attends to a context instead; window the context's own encoder",
        example=dict(attn_max_attend_past=2, only_cross=True), kinds=("encoder", "cross"))
declare("attn_max_attend_past", "depths", when=lambda s: s.get("attn_max_attend_past") is not None
        and blocks(s) > 1,
        reason="a funnel's pooled queries read the unpooled sequence's keys, where places back along one "
               "sequence do not line up; use a single block or drop the window",
        example=dict(attn_max_attend_past=2, depths=(1, 1)), kinds=("funnel",))
# gates and output projection (gating.py)
declare("attn_dim_out", "a layer stack", when=lambda s: s.get("attn_dim_out") is not None,
        reason="a stack adds each block's output to its input, so the output is dim wide; attn_dim_out is for a "
               "standalone Attention (x_transformers.x_transformers.Attention(dim, dim_out=...))",
        example=dict(attn_dim_out=16))
def _gate_widths(s: dict, which: str) -> tuple[int, int]:
    """(input, output) widths of a low-rank gate: the output gate reads the merged heads, the value
    gate the block's input; each writes one logit per channel, or per head when headwise."""
    heads = s.get("heads", 8)
    inner = heads * (s.get("attn_dim_head") or 64)
    out = heads if on(s, f"attn_{which}_headwise") else inner
    return (inner if which == "output_gate" else s.get("dim", inner)), out


for _w, _r in (("output_gate", "attn_output_gate_rank"), ("gate_values", "attn_gate_values_rank")):
    declare(_r, "heads", "attn_dim_head",
            when=lambda s, w=_w, r=_r: on(s, "attn_" + w) and s.get(r) is not None
            and all(s[r] >= width for width in _gate_widths(s, w)),
            reason="a low-rank gate's rank must be below its input or output width (heads x attn_dim_head, or "
                   "heads when headwise), else the factorisation is not low-rank; lower the rank or leave it out "
                   "for a full gate",
            example={"attn_" + _w: True, _r: 4, "heads": 1, "attn_dim_head": 4, "dim": 4})
declare("attn_zero_init_output", "attn_output_proj_depth",
        when=lambda s: on(s, "attn_zero_init_output") and s.get("attn_output_proj_depth") is not None,
        reason="two initialisations of the output projection; choose one",
        example=dict(attn_zero_init_output=True, attn_output_proj_depth=2))
for _k in ("attn_on_attn", "attn_zero_init_output", "attn_output_proj_depth"):
    declare(_k, "attn_project_out=False", when=lambda s, k=_k: on(s, k) and s.get("attn_project_out") is False,
            reason="it configures the output projection, which attn_project_out=False removes",
            example={_k: {"attn_on_attn": True, "attn_zero_init_output": True, "attn_output_proj_depth": 2}[_k],
                     "attn_project_out": False})
# logits and values: sigmoid is a normaliser, an alternative to the entmax family. (Upstream also
# refuses sigmoid, L2 distance and top-k with one another; here they compose: L2 distance sets the
# logits, top-k keeps the k largest of them, sigmoid or softmax turns the kept ones into weights.)
for _e in ENTMAX:
    declare("attn_sigmoid", _e, when=lambda s, e=_e: on(s, "attn_sigmoid") and on(s, e),
            reason="each sets how scores become weights; choose one (as upstream)",
            example={"attn_sigmoid": True, _e: EXAMPLE_ON[_e]})
for _e in ENTMAX:
    declare("attn_head_learned_sink", "attn_l2_distance", _e,
            when=lambda s, e=_e: on(s, "attn_head_learned_sink") and on(s, "attn_l2_distance") and on(s, e),
            reason="L2-distance scores are at most 0 and the sink's logit starts at 0, so a sparse normaliser puts "
                   "every weight on the sink, whose value is zero: the attention outputs zeros and nothing in it "
                   "learns; use softmax, or drop the sink or the L2 distance",
            example={"attn_head_learned_sink": True, "attn_l2_distance": True, _e: EXAMPLE_ON[_e]})
declare("attn_qk_rmsnorm", "attn_k_rmsnorm", when=lambda s: on(s, "attn_qk_rmsnorm") and on(s, "attn_k_rmsnorm"),
        reason="attn_qk_rmsnorm already normalises the keys; choose one", example=dict(attn_qk_rmsnorm=True,
                                                                                       attn_k_rmsnorm=True))
for _r in ("attn_qk_rmsnorm", "attn_k_rmsnorm"):
    declare(_r, "attn_qk_norm", when=lambda s, r=_r: on(s, r) and on(s, "attn_qk_norm"),
            reason="QK-norm scales q and k to unit length, which undoes the RMSNorm; choose one",
            example={_r: True, "attn_qk_norm": True})
declare("attn_k_rmsnorm", "attn_shared_qk", when=lambda s: on(s, "attn_k_rmsnorm") and on(s, "attn_shared_qk"),
        reason="shared-QK's keys are the unit-normalised queries; use attn_qk_rmsnorm to normalise both",
        example=dict(attn_k_rmsnorm=True, attn_shared_qk=True), kinds=("decoder", "encoder", "funnel", "xtransformer"))
declare("attn_cog_signed", "attn_shared_qk", when=lambda s: on(s, "attn_cog_signed") and on(s, "attn_shared_qk"),
        reason="shared-QK hides a query's own key behind a large negative logit, which signed attention's "
               "|logits| would make the largest",
        example=dict(attn_cog_signed=True, attn_shared_qk=True), kinds=("decoder", "encoder", "funnel", "xtransformer"))
declare("attn_laser", "attn_cog_signed", when=lambda s: on(s, "attn_laser") and on(s, "attn_cog_signed"),
        reason="LASER takes the log of the attention output over exp(v), which signed weights can make negative",
        example=dict(attn_laser=True, attn_cog_signed=True))

# issue 20's second half: normalisers (score_variants.py), value residual, widths, partial rotary.
# Upstream's one-normaliser rule extends to hard and Gumbel attention
_ONE_OF = ("attn_hard", "attn_gumbel_softmax")
for _a in _ONE_OF:
    for _b in ("attn_sigmoid", "attn_l2_distance", "attn_sparse_topk") + ENTMAX + _ONE_OF[_ONE_OF.index(_a) + 1:]:
        declare(_a, _b, when=lambda s, a=_a, b=_b: on(s, a) and on(s, b),
                reason="each sets how scores become weights; choose one (as upstream)",
                example={_a: True, _b: EXAMPLE_ON[_b]})
_NOT_CAUSAL = ("encoder", "cross", "funnel")
declare("attn_selective", "a bidirectional stack", when=lambda s: on(s, "attn_selective"), kinds=_NOT_CAUSAL,
        reason="selective attention lets a token hide itself from later queries, a causal idea (2410.02703); "
               "use it in a Decoder", example=dict(attn_selective=True))
declare("attn_selective", "XTransformer's encoder",
        when=lambda s: on(s, "attn_selective") or on(s, "enc_attn_selective"), kinds=XT,
        reason="the encoder is bidirectional and selective attention is causal; give dec_attn_selective",
        example=dict(attn_selective=True))
declare("attn_inverted_attention", "causal", when=lambda s: on(s, "attn_inverted_attention")
        or on(s, "dec_attn_inverted_attention") or on(s, "enc_attn_inverted_attention"), kinds=("decoder",) + XT,
        reason="inverted attention normalises each key's scores over the queries, so a query's output would "
               "depend on later queries (and an XTransformer's encoder has no cross-attention); use it in an "
               "Encoder(cross_attend=True) or a CrossAttender", example=dict(attn_inverted_attention=True))
declare("attn_inverted_attention", "cross_attend=False", when=lambda s: on(s, "attn_inverted_attention")
        and not on(s, "cross_attend") and not on(s, "only_cross"), kinds=("encoder", "funnel"),
        reason="inverted attention is a cross-attention variant (queries compete for the context's keys); set "
               "cross_attend=True", example=dict(attn_inverted_attention=True))
for _k in ENTMAX + ("attn_sigmoid", "attn_sparse_topk", "attn_hard", "attn_gumbel_softmax", "attn_head_learned_sink",
                    "attn_cog_signed"):
    declare("attn_inverted_attention", _k, when=lambda s, k=_k: on(s, "attn_inverted_attention") and on(s, k),
            reason="inverted attention is a softmax over the queries then a sum-to-one over the keys; it takes no "
                   "other normaliser, sink or sign", kinds=("encoder", "cross", "funnel"),
            example={"attn_inverted_attention": True, _k: EXAMPLE_ON[_k], "only_cross": True})
declare("add_value_residual", "reversible", when=lambda s: on(s, "add_value_residual") and on(s, "reversible"),
        reason="the first attention's values would cross the reversible coupling's recomputation, which carries "
               "only the two streams; drop one", example=dict(add_value_residual=True, reversible=True))
declare("add_value_residual", "FunnelEncoder", when=lambda s: on(s, "add_value_residual"), kinds=FUNNEL,
        reason="the funnel's blocks attend over sequences of different lengths (pooled), so the first attention's "
               "values do not line up with a later block's", example=dict(add_value_residual=True))
declare("attn_rotate_num_heads", "heads", when=lambda s: on(s, "attn_rotate_num_heads")
        and s["attn_rotate_num_heads"] > min(head_counts(s)),
        reason="it counts the heads rotary turns, at most heads", kinds=("decoder", "encoder", "funnel") + XT,
        example=dict(rotary_pos_emb=True, attn_rotate_num_heads=9))
declare("attn_rotate_num_heads", "attn_kv_heads", when=lambda s: on(s, "attn_rotate_num_heads")
        and on(s, "attn_kv_heads") and any(s["attn_kv_heads"] != h for h in head_counts(s)),
        reason="a key head serves several query heads under grouped-query attention, so it cannot be rotated for "
               "some and not others (upstream refuses it too)", kinds=("decoder", "encoder", "funnel") + XT,
        example=dict(rotary_pos_emb=True, attn_rotate_num_heads=2, attn_kv_heads=2))
declare("attn_qk_norm_dim_scale", "attn_qk_norm_scale", when=lambda s: on(s, "attn_qk_norm_dim_scale")
        and "attn_qk_norm_scale" in s,
        reason="with per-channel gains the logit scale is dim_head ** -0.5 (as upstream), so there is no QK-norm "
               "scale to set", example=dict(attn_qk_norm=True, attn_qk_norm_dim_scale=True, attn_qk_norm_scale=5.0))
declare("attn_qk_norm_groups", "attn_dim_head", when=lambda s: on(s, "attn_qk_norm") and s.get("attn_qk_norm_groups", 1) > 1
        and (s.get("attn_dim_head", 64) % s["attn_qk_norm_groups"] or s.get("attn_dim_head", 64) // s["attn_qk_norm_groups"] < 3),
        reason="the groups must divide the head dimension into groups of at least 3 channels (a unit vector of 2 or "
               "fewer channels carries almost nothing; upstream refuses it too)",
        example=dict(attn_qk_norm=True, attn_qk_norm_groups=4, attn_dim_head=8))
# multi-latent attention's decoupled rope heads (attention.py)
declare("attn_latent_rope_subheads", "attn_rotate_num_heads", when=lambda s: on(s, "attn_latent_rope_subheads")
        and on(s, "attn_rotate_num_heads"),
        reason="the decoupled rope heads are the heads rotary turns; give one of the two (as upstream)",
        example=dict(attn_use_latent_kv=True, attn_dim_latent_kv=8, attn_latent_rope_subheads=1, rotary_pos_emb=True,
                     attn_rotate_num_heads=1), kinds=("decoder", "encoder", "funnel") + XT)
declare("attn_latent_rope_subheads", "heads", "attn_kv_heads", when=lambda s: on(s, "attn_latent_rope_subheads")
        and (s["attn_latent_rope_subheads"] >= min(head_counts(s))
             or on(s, "attn_kv_heads") and any(s["attn_kv_heads"] != h for h in head_counts(s))),
        reason="the rope heads are the last of the key heads, so they must be fewer than heads; and a key head "
               "serves several query heads under grouped-query attention, so it cannot be one (upstream refuses "
               "it too)", example=dict(attn_use_latent_kv=True, attn_dim_latent_kv=8, attn_latent_rope_subheads=8))
declare("attn_latent_rope_subheads", "attn_shared_qk", when=lambda s: on(s, "attn_latent_rope_subheads")
        and on(s, "attn_shared_qk"),
        reason="shared-QK's keys are the queries, so there are no key heads to take from x",
        example=dict(attn_use_latent_kv=True, attn_dim_latent_kv=8, attn_latent_rope_subheads=1, attn_shared_qk=True),
        kinds=("decoder", "encoder", "funnel") + XT)
declare("attn_use_rel_proj_pos_bias", "only_cross", when=lambda s: on(s, "attn_use_rel_proj_pos_bias")
        and on(s, "only_cross"), kinds=("encoder", "cross"),
        reason="it biases self-attention by the distance between positions of one sequence, and a "
               "cross-attention-only stack has no self-attention", example=dict(attn_use_rel_proj_pos_bias=True,
                                                                                only_cross=True))
declare("attn_use_rel_proj_pos_bias", "depths", when=lambda s: on(s, "attn_use_rel_proj_pos_bias") and blocks(s) > 1,
        reason="a funnel's pooled queries read the unpooled sequence's keys, where distances along one sequence do "
               "not line up; use a single block", example=dict(attn_use_rel_proj_pos_bias=True, depths=(1, 1)),
        kinds=FUNNEL)
declare("attn_laser", "attn_pre_scale_post_talking_heads", when=lambda s: on(s, "attn_laser")
        and on(s, "attn_pre_scale_post_talking_heads"),
        reason="LASER takes the log of the attention output over exp(v), which weights multiplied by logits can "
               "make negative (as with signed weights)", example=dict(attn_laser=True,
                                                                    attn_pre_scale_post_talking_heads=True))
