"""Attention features (issue: the seed's attention features)."""

from harness import register

register("mem_kv", layers=dict(attn_num_mem_kv=3))
register("talking_heads", layers=dict(attn_talking_heads=True))
register("pre_talking_heads", layers=dict(attn_pre_talking_heads=True))
# entmax is sparse: a key outside a query's support gets exactly zero weight and zero gradient,
# so a memory key/value that no query selects can stay without gradient
SPARSE_SUPPORT = ("mem_k", "mem_v")
register("entmax15", layers=dict(attn_use_entmax15=True), group="normalizer", tol=1e-4, zero_grad=SPARSE_SUPPORT)
register("entmax_alpha", layers=dict(attn_entmax_alpha=1.3), group="normalizer", tol=1e-4, zero_grad=SPARSE_SUPPORT)
register("learned_entmax_alpha", layers=dict(attn_learned_entmax_alpha=True), group="normalizer", tol=1e-4,
         zero_grad=SPARSE_SUPPORT)
# top-k is sparse too: a memory key/value that is in no query's top k gets no gradient
register("sparse_topk", layers=dict(attn_sparse_topk=3), group="normalizer", zero_grad=SPARSE_SUPPORT)
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
register("sparse_top1", layers=dict(attn_sparse_topk=1), group="normalizer",
         zero_grad=("to_q", "to_k", "pre_norm", "mem_k", "mem_v", "pre_mix", "qk_scale", "q_gain", "k_gain",
                    "to_latent_q", "to_rope_k", "rel_pos.", "rel_proj.", "tupe.", "polar.", "post_norm.g",
                    ".integrate."))  # (LIMe's routers: as the pre-norms, in the rows where those are zero)
register("mem_kv_qk_norm", layers=dict(attn_num_mem_kv=2, attn_qk_norm=True), zero_grad=QK_SCALE_INVARIANT)
register("shared_qk_mem_kv", layers=dict(attn_shared_qk=True, attn_num_mem_kv=1), group="kv")
