"""Layer-structure features (issue: the seed's layer-structure features)."""

from harness import register

register("scalenorm", layers=dict(use_scalenorm=True), group="norm")
register("rmsnorm", layers=dict(use_rmsnorm=True), group="norm")
register("post_norm", layers=dict(pre_norm=False), group="placement")
# Sandwich norm renormalises each branch's output: a ScaleNorm pre-norm's one-scalar gain ("pre_norm.g")
# in front of a bias-free, positively homogeneous branch (a ReLU² GLU feed-forward without biases) only
# scales what is normalised again, so its gradient is zero up to rounding (cross: par_ratio's last
# feed-forward with ff_no_bias, ReLU², a GLU's multiplicative bias)
register("sandwich_norm", layers=dict(sandwich_norm=True), group="placement", zero_grad=("pre_norm.g",))
# ReZero (2003.04887): each branch sits behind a zero gate, so at init no gradient reaches the
# branches, what only they read (the T5 bias, TUPE's tables, PoPE's key phase, memory tokens) or, under an
# encoder-decoder, the encoder; one optimizer step opens the gates
register("rezero", layers=dict(use_rezero=True), group="placement",
         zero_init=("gate", ".fn.", "rel_pos.", "tupe.", "polar.", "memory_tokens", "encoder.token_emb", "encoder.pos_emb",
                    "upsampler", ".integrate."))  # (LIMe's routers mix block inputs all equal while the gates are shut)
register("ff_glu", layers=dict(ff_glu=True, ff_activation="swish"))
register("ff_relu_squared", layers=dict(ff_activation="relu_squared"))
register("ff_no_bias", layers=dict(ff_no_bias=True))
register("ff_chunks", layers=dict(ff_chunks=3))
register("macaron", layers=dict(macaron=True), group="layout")
register("sandwich_coef", layers=dict(sandwich_coef=1), group="layout")
register("top_attn_to_ff", layers=dict(top_attn_to_ff=1))
register("reversible", layers=dict(reversible=True))
register("reversible_dropout", layers=dict(reversible=True, attn_dropout=0.1, ff_dropout=0.1, layer_dropout=0.2))
# an explicit order with two feed-forwards between attentions (no "c": encoder and decoder kinds only,
# since a decoder without cross-attention cannot take the encoder-decoder's context)
register("custom_layers", layers=dict(custom_layers=("a", "f", "f", "a", "f")), kinds=("encoder", "decoder"), group="layout")
register("norm_no_bias", layers=dict(norm_bias=False))
