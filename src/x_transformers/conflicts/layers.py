"""The conflict table's entries for norms, residuals, feed-forwards, layout and positions."""

from __future__ import annotations

from . import *  # noqa: F401,F403 - the machinery: declare, the predicates' helpers, the kinds

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
# (only_attn with top_attn_to_ff: the attention-only layout's last n self-attentions become
# feed-forwards, as on any other layout: layout.build_layout)
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

# q, k, v from three mixtures: hyper-connections' reads (num_residual_streams > 1) or LIMe's
_QKV = lambda s: on(s, "qkv_receive_diff_residuals") or on(s, "integrate_layers")
declare("qkv_receive_diff_residuals", "num_residual_streams",
        when=lambda s: on(s, "qkv_receive_diff_residuals") and not on(s, "integrate_layers") and not (
            _STREAMS(s) and not on(s, "gated_multi_residual")),
        reason="q, k and v read three mixtures of the residual streams: it needs hyper-connections "
               "(num_residual_streams > 1, not gated_multi_residual) or integrate_layers",
        example=dict(qkv_receive_diff_residuals=True))
for _k, _ex in (("attn_shared_qk", True), ("shift_tokens", 1)):
    declare("qkv_receive_diff_residuals", _k, when=lambda s, k=_k: _QKV(s) and on(s, k),
            reason="self-attention's keys would not read their own input (shared-QK: the keys are the queries; "
                   "token shift: one sequence is shifted)",
            example={"integrate_layers": True, _k: _ex})
declare("qkv_receive_diff_residuals", "FunnelEncoder", when=lambda s: on(s, "qkv_receive_diff_residuals"),
        reason="a funnel's pooled queries read keys and values from the unpooled sequence, not a mixture",
        example=dict(qkv_receive_diff_residuals=True, num_residual_streams=2), kinds=("funnel",))
# LIMe (2502.09245): block l mixes the inputs of blocks 0..l of one run, each block run once, in order
# (aggregated residuals likewise, by attention over the same inputs)
_AGG = {"attn_aggregated_residuals": True, "attn_aggregated_residual_kwargs": {"lora_rank": 4}}
for _f, _fex in (("integrate_layers", {"integrate_layers": True}), ("attn_aggregated_residuals", _AGG)):
    # (layer_dropout is fine: a dropped block's input is still recorded, so the count holds)
    for _k, _ex in (("reversible", True), ("weight_tie_layers", True), ("layers_execute_order", (0, 1))):
        declare(_f, _k, when=lambda s, f=_f, k=_k: on(s, f) and on(s, k),
                reason="block l mixes the inputs of blocks 0..l, each run once in the built order (a repeated or "
                       "reordered block changes that count; the reversible coupling has no block inputs)",
                example={**_fex, _k: _ex})
for _k, _ex in (("integrate_layers", True), ("qkv_receive_diff_residuals", True), ("gate_residual", True),
                ("orthog_residual", True), ("mv_split_residual", True), ("gated_multi_residual", True),
                ("scale_residual", 0.5), ("depth_scale_residual", True)):
    declare("attn_aggregated_residuals", _k, when=lambda s, k=_k: on(s, "attn_aggregated_residuals") and (
                on(s, k) and not (k == "scale_residual" and s[k] is True)),
            reason="aggregated residuals choose each branch's input their own way and run the branches unscaled "
                   "(upstream: mutually exclusive, or the scale silently dropped); choose one",
            example={**_AGG, _k: _ex, **({"num_residual_streams": 2} if _k == "qkv_receive_diff_residuals" else {}),
                     **({"num_residual_streams": 2, "residual_fn_kwargs": {"read_gate_rank": 2}}
                        if _k == "gated_multi_residual" else {})},
            kinds=tuple(k for k in STACK_KINDS if k != "funnel") if _k == "qkv_receive_diff_residuals" else STACK_KINDS)
