"""The conflict table's entries for attention keywords (``attn_*``): see the package docstring."""

from __future__ import annotations

from . import *  # noqa: F401,F403 - the machinery: declare, the predicates' helpers, the kinds

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
# belief attention projects each query's output off its own value: self-attention only, and its
# output (one copy per option) is wider than the heads' concatenation, so it needs the projection
for _k in ("attn_orthog_projected_values", "attn_orthog_projected_values_per_head"):
    declare(_k, "only_cross", when=lambda s, k=_k: on(s, k) and on(s, "only_cross"),
            reason="a query's own value exists in self-attention only, which a cross-attention-only stack lacks",
            example={_k: True, "only_cross": True}, kinds=("encoder", "cross"))
    declare(_k, "attn_project_out=False", when=lambda s, k=_k: on(s, k) and s.get("attn_project_out") is False,
            reason="the projected outputs are concatenated and need the output projection back to dim",
            example={_k: True, "attn_project_out": False}, kinds=("decoder", "encoder", "funnel", "xtransformer"))

# issue 20's content positions and what joins the heads' output (data_positions.py, hybrid.py): each is a
# self-attention feature (a cross-attention block builds without it), so a stack without self-attention
# refuses it, and a funnel's pooled queries (keys from the unpooled sequence) cannot line them up
_NOT_CAUSAL_KINDS = ("encoder", "cross", "funnel")
_SELF_ONLY = {"attn_data_dependent_alibi": True, "attn_use_cope": True}  # (belief attention: above)
for _k, _v in _SELF_ONLY.items():  # (CoPE on an encoder or a CrossAttender: refused below as bidirectional)
    declare(_k, "only_cross", when=lambda s, k=_k: on(s, k) and on(s, "only_cross"),
            kinds=("decoder",) if _k == "attn_use_cope" else ("decoder", "encoder", "cross"),
            reason="a self-attention feature, and a cross-attention-only stack has no self-attention",
            example={_k: _v, "only_cross": True, "cross_attend": True})
declare("attn_hybrid_module", "only_cross", when=lambda s: on(s, "attn_hybrid_module") and on(s, "only_cross"),
        kinds=("decoder", "encoder", "cross"), reason="the module runs beside self-attention, and a cross-attention-only stack "
                                           "has none", example=dict(attn_hybrid_module="a GRU", only_cross=True, cross_attend=True))
for _k, _why in (("attn_data_dependent_alibi", "it sums forget gates along the sequence between a query and a key"),):
    declare(_k, "depths", when=lambda s, k=_k: on(s, k) and blocks(s) > 1, kinds=("funnel",),
            reason=f"{_why}, and a funnel's pooled queries read the unpooled sequence's keys and values; use a "
                   f"single block", example={_k: True, "depths": (1, 1)})
declare("attn_use_cope", "a bidirectional stack", when=lambda s: on(s, "attn_use_cope"), kinds=_NOT_CAUSAL_KINDS,
        reason="CoPE counts the keys between a key and its query whose gates open, which is defined over the keys "
               "before the query (causal attention, 2405.18719, as upstream); use it in a Decoder",
        example=dict(attn_use_cope=True))
declare("attn_use_cope", "XTransformer's encoder", when=lambda s: on(s, "attn_use_cope") or on(s, "enc_attn_use_cope"),
        kinds=XT, reason="the encoder is bidirectional and CoPE causal; give dec_attn_use_cope",
        example=dict(attn_use_cope=True))
declare("attn_data_dependent_alibi_per_row", "a bidirectional stack",
        when=lambda s: on(s, "attn_data_dependent_alibi_per_row"), kinds=("encoder", "funnel"),
        reason="the per-row gates are summed over the tokens before each query only (as upstream); the plain "
               "attn_data_dependent_alibi has a bidirectional form",
        example=dict(attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True))
declare("attn_data_dependent_alibi_per_row", "XTransformer's encoder",
        when=lambda s: on(s, "attn_data_dependent_alibi_per_row") or on(s, "enc_attn_data_dependent_alibi_per_row"),
        kinds=XT, reason="the encoder is bidirectional and the per-row gates causal; give "
                         "dec_attn_data_dependent_alibi_per_row",
        example=dict(attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True))
declare("max_mem_len", "attn_data_dependent_alibi", when=lambda s: on(s, "max_mem_len")
        and on(s, "attn_data_dependent_alibi"), kinds=("wrapper",),
        reason="the forget gates are summed along the segment's own tokens; Transformer-XL memory keys sit before "
               "the segment, where no gate was kept", example=dict(max_mem_len=4, attn_data_dependent_alibi=True))
for _other in ("attn_sigmoid", "attn_hard", "attn_gumbel_softmax") + ENTMAX:
    declare("attn_custom_attn_fn", _other, when=lambda s, o=_other: on(s, "attn_custom_attn_fn") and on(s, o),
            reason="each sets how scores become weights; choose one",
            example={"attn_custom_attn_fn": EXAMPLE_ON["attn_custom_attn_fn"], _other: EXAMPLE_ON[_other]})
