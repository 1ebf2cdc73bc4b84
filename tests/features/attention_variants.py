"""Attention score modifications (issue 20): softcapping, sliding window, sinks, zero key/value."""

from harness import register

# a cap that QK-norm's logits (up to its scale, 10) reach without saturating tanh in float32
register("softclamp", layers=dict(attn_softclamp_logits=True, attn_logit_softclamp_value=5.0))
# a window shorter than the harness's sequences; refused (declared) on a cross-attention-only stack
# and on a pooling funnel
register("sliding_window", layers=dict(attn_max_attend_past=2), kinds=("decoder", "encoder", "encdec"))
register("head_sink", layers=dict(attn_head_learned_sink=True))
register("zero_kv", layers=dict(attn_add_zero_kv=True))
