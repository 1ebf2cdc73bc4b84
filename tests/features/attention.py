"""Attention features (issue: the seed's attention features)."""

from torch import nn

from harness import register

register("mem_kv", layers=dict(attn_num_mem_kv=3))
register("talking_heads", layers=dict(attn_talking_heads=True))
register("pre_talking_heads", layers=dict(attn_pre_talking_heads=True))
# entmax is sparse: a key outside a query's support gets exactly zero weight and zero gradient,
# so a memory key/value that no query selects can stay without gradient
SPARSE_SUPPORT = ("mem_k", "mem_v")
register("entmax15", layers=dict(attn_use_entmax15=True), group="normalizer", tol=1e-4, zero_grad=SPARSE_SUPPORT)
register("entmax_alpha", layers=dict(attn_entmax_alpha=1.3), group="normalizer", tol=1e-4, zero_grad=SPARSE_SUPPORT)
# A learned alpha shapes the weights only as far as the scores differ: with near-constant scores the
# weights are uniform for every alpha and its gradient is zero up to rounding (a norm-free placement
# such as derf keeps the embeddings' 0.02 scale: a funnel's last block saw score spreads of 3e-8 at
# init). Declared zero at init: it must move once the projections have taken a step.
register("learned_entmax_alpha", layers=dict(attn_learned_entmax_alpha=True), group="normalizer", tol=1e-4,
         zero_grad=SPARSE_SUPPORT, zero_init=("entmax_alpha_logit",))
# top-k is sparse too: a memory key/value that is in no query's top k gets no gradient
register("sparse_topk", layers=dict(attn_sparse_topk=3), group="normalizer", zero_grad=SPARSE_SUPPORT, cache_float64=True)
register("dim_head", layers=dict(attn_dim_head=12))
register("shared_qk", layers=dict(attn_shared_qk=True), group="kv")
register("kv_heads", layers=dict(attn_kv_heads=2), group="kv")
register("multi_query", layers=dict(attn_kv_heads=1), group="kv")
# QK-norm normalises queries and keys: a ScaleNorm gain (one scalar) before a cross-attention, whose
# keys/values come from the context, scales only the queries and cancels, so its gradient is zero up
# to rounding
QK_SCALE_INVARIANT = ("pre_norm.g",)
register("qk_norm", layers=dict(attn_qk_norm=True), zero_grad=QK_SCALE_INVARIANT)
register("attn_bias", layers=dict(attn_bias=True))
register("memory_tokens", wrapper=dict(num_memory_tokens=2))
register("post_talking_heads", layers=dict(attn_post_talking_heads=True))
# top-1 attention is a constant softmax (one key, weight 1): no gradient reaches the scores, so none
# reaches what only shapes them: queries, keys, a norm that feeds only the queries (CrossAttender's),
# memory keys, pre-softmax head mixing, QK-norm's scale and gains, MLA's query
# latent and rope keys, T5, TUPE, PoPE and relative projection terms;
# and a memory value reaches the output only when its key is some query's top one. Under post-norm
# ScaleNorm, a block's one-scalar gain ("post_norm.g") feeds a top-1 attention block that is linear in
# its input and normalised again by a ScaleNorm: scale-invariant, so its gradient is zero up to the
# norm's eps (exactly zero in some rows: decoder macaron+post_norm+qk_norm+scalenorm+tupe_cls)
register("sparse_top1", layers=dict(attn_sparse_topk=1), group="normalizer", cache_float64=True,
         zero_grad=("to_q", "to_k", "pre_norm", "mem_k", "mem_v", "pre_mix", "qk_scale", "q_gain", "k_gain",
                    "to_latent_q", "to_rope_k", "rel_pos.", "rel_proj.", "tupe.", "polar.", "post_norm.g", "cope.",
                    "forget_bias.", ".integrate.", "reinject"))
# (LIMe's routers: as the pre-norms, in the rows where those are zero. The re-injection of a funnel's
# pooled block reaches only its pooled queries: its keys and values come from the unpooled sequence)
register("mem_kv_qk_norm", layers=dict(attn_num_mem_kv=2, attn_qk_norm=True), zero_grad=QK_SCALE_INVARIANT)
register("shared_qk_mem_kv", layers=dict(attn_shared_qk=True, attn_num_mem_kv=1), group="kv")

# issue 20: positions from the content (data_positions.py; tests/test_data_positions.py). CoPE is causal;
# its position table starts at zero, so the gates' head mix has no gradient until it moves
register("cope", layers=dict(attn_use_cope=True, attn_cope_max_pos=4, attn_cope_talking_heads=True),
         kinds=("decoder",), zero_init=("cope.mix",))
register("forgetting", layers=dict(attn_data_dependent_alibi=True), kinds=("decoder", "encoder", "encdec"))
register("forgetting_per_row", layers=dict(attn_data_dependent_alibi=True, attn_data_dependent_alibi_per_row=True,
                                           attn_data_dependent_alibi_per_row_dim_head=4), kinds=("decoder",))
# a GRU beside attention (hybrid.py; tests/test_hybrid.py; belief attention: attention_variants.py). The GRU reads dim 32 and is as
# wide as the heads' output (4 x 8), so the feature fixes those sizes (an alternative of features that set them);
# it runs over padded tokens too (a user's module, given no mask in a causal stack)
register("hybrid_gru", layers=dict(dim=32, heads=4, attn_dim_head=8, attn_value_dim_head=8, attn_hybrid_learned_mix=True,
                                   attn_hybrid_module=nn.GRU(32, 32, batch_first=True)),
         kinds=("decoder",), padding_invariant=False)


def _sharper_softmax(scores):
    """A user's normaliser (attn_custom_attn_fn): softmax at half the temperature."""
    return (2 * scores).softmax(dim=-1)


register("custom_attn_fn", layers=dict(attn_custom_attn_fn=_sharper_softmax), group="normalizer",
         kinds=("decoder", "encoder", "cross"))
