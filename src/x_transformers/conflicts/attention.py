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
