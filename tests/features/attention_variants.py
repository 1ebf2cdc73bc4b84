"""Attention score modifications (issue 20): softcapping, sliding window, sinks, zero key/value."""

from harness import register

# a cap that QK-norm's logits (up to its scale, 10) reach without saturating tanh in float32
register("softclamp", layers=dict(attn_softclamp_logits=True, attn_logit_softclamp_value=5.0))
# a window shorter than the harness's sequences; refused (declared) on a cross-attention-only stack
# and on a pooling funnel
register("sliding_window", layers=dict(attn_max_attend_past=2), kinds=("decoder", "encoder", "encdec"))
# under entmax (sparse) a sink outside every query's support gets exactly zero weight and gradient,
# as memory key/values do; its gradient under softmax is tested in test_attention_variants.py
register("head_sink", layers=dict(attn_head_learned_sink=True), zero_grad=(".sink",))
register("zero_kv", layers=dict(attn_add_zero_kv=True))

# gates and scales around the output (gating.py). A low-rank gate's up-projection starts at zero,
# so its down-projection has no gradient at init. Left out: attn_zero_init_output and
# attn_swiglu_values, whose attention output is exactly zero at init (every parameter before it
# then has no gradient at init, a list no feature can declare): tests/test_attention_gating.py
register("gate_values", layers=dict(attn_gate_values=True), group="attn_gates")
# (a low-rank gate is one more zero-initialised link: under ReZero an encoder-decoder's chain of
# gates, cross-attention's then the encoder's, then the up then the down projection, opens in four
# optimizer steps, one more than the grads property allows; the encdec kind runs the linear gate)
LOW_RANK_KINDS = ("decoder", "encoder", "cross", "funnel")
register("gates_low_rank_headwise", layers=dict(attn_gate_values=True, attn_gate_values_rank=4, attn_output_gate=True,
                                                attn_output_gate_headwise=True), zero_init=("input_gate.down",),
         group="attn_gates", kinds=LOW_RANK_KINDS)
register("output_gate", layers=dict(attn_output_gate=True, attn_output_gate_rank=4, attn_low_rank_silu_gates=False),
         zero_init=("output_gate.down",), group="attn_gates", kinds=LOW_RANK_KINDS)
register("gate_value_heads", layers=dict(attn_gate_value_heads=True))
register("head_scale", layers=dict(attn_head_scale=True))
register("on_attn", layers=dict(attn_on_attn=True))
register("output_proj_depth", layers=dict(attn_output_proj_depth=3))
register("sublayer_dropout", layers=dict(attn_sublayer_dropout=0.1))

# how scores become weights, and the norms of q, k, v (tests/test_attention_logits.py)
register("sigmoid_attn", layers=dict(attn_sigmoid=True), group="normalizer")
register("cog_signed", layers=dict(attn_cog_signed=True))
register("l2_distance", layers=dict(attn_l2_distance=True))
register("laser", layers=dict(attn_laser=True), tol=1e-4)
# q, k and v all RMS-normalised: a ScaleNorm gain (one scalar) before the attention cancels, so its
# gradient is zero up to rounding (as with QK-norm). So does the encoder's final ScaleNorm gain of an
# encoder-decoder: its output reaches the decoder only as cross-attention keys and values, both
# RMS-normalised
register("qk_rmsnorm", layers=dict(attn_qk_rmsnorm=True, attn_value_rmsnorm=True),
         zero_grad=("pre_norm.g", "encoder.attn_layers.final_norm.g"))

# issue 20's second half, few features on the kinds where they add a property to check (the decoder:
# cache agreement; a cross-attention variant on the cross kind), keywords that combine freely in one
# feature, since the harness's cost grows with every feature-kind pair. Left to their own tests:
# attn_hard (Gumbel's eval mode is the same function), attn_sparse_topk_straight_through (top-k's
# forward), attn_pre_scale_post_talking_heads (tests/test_score_variants.py, cache included).
# Gumbel attention is checked in eval mode, where it is its noise-free mode (deterministic,
# cache-exact): one-hot weights, so a value gets a gradient only through the key each query takes
# and a memory value none may take (as under top-1). Selective attention cannot use a cache
# (counted not applicable).
register("value_residual", layers=dict(add_value_residual=True), kinds=("decoder", "encdec"))
register("value_width_qk_gains", layers=dict(attn_value_dim_head=6, attn_qk_norm=True, attn_qk_norm_groups=2,
                                             attn_qk_norm_dim_scale=True),
         kinds=("decoder",), zero_grad=("pre_norm.g",))  # (a ScaleNorm gain cancels, as under QK-norm)
# MLA with its decoupled rope heads (unrotated here: with rotary the feature would be a positional
# scheme, which test_positional composes with grouped-query heads, refused for rope heads)
register("multi_latent", layers=dict(attn_use_latent_q=True, attn_dim_latent_q=12, attn_use_latent_kv=True,
                                     attn_dim_latent_kv=10, attn_latent_rope_subheads=1), kinds=("decoder",))
register("gumbel_attn", layers=dict(attn_gumbel_softmax=True, attn_gumbel_softmax_temp=0.5), group="normalizer",
         kinds=("decoder",), zero_grad=("mem_v",))
register("selective", layers=dict(attn_selective=True), kinds=("decoder",), cacheable=False)
register("inverted_attention", layers=dict(attn_inverted_attention=True), kinds=("cross",))
register("rel_proj_pos_bias", layers=dict(attn_use_rel_proj_pos_bias=True, attn_rel_proj_max_dist=4),
         kinds=("decoder",))
# belief attention (issue 19): each query's output off its own value; a CrossAttender has no own value.
# Projecting out the own value cancels most of the output: float32 rounding shows (2e-5 to 5e-5 between
# cached and whole-sequence decoding with QK RMSNorm and sandwich norm), so its cache check is in float64
register("orthog_values", layers=dict(attn_orthog_projected_values=True, attn_orthog_projected_values_per_head=True),
         kinds=("decoder", "encoder", "encdec", "funnel"), cache_float64=True)
