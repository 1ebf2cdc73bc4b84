"""TransformerWrapper's upstream options that change the computation (issue 18)."""

from harness import register

# a per-token, per-unit scale of every feed-forward output (ones at init, learned): the properties
# check it under the cache (each new token's own rows), padding and every backend. Its gradient is zero
# at init where a zero-initialised gate follows the feed-forwards (ReZero, LayerScale at 0, zero-init
# branch outputs)
register("ff_deep_embed", wrapper=dict(ff_deep_embed=True), kinds=("decoder", "encoder", "cross"),
         zero_init=("ff_deep_embed",))

# the looped LM (looped.py), two loop steps: each step keeps its own keys in the cache, so the cached
# forward equals the full one. The exit gate is trained by AutoregressiveWrapper's looped loss only:
# the logits never read it (no gradient, by design)
register("looped", layers=dict(pre_and_post_norm=True), wrapper=dict(looped=True, max_looped_steps=2),
         kinds=("decoder", "encoder", "cross"), zero_grad=("exit_gate",))
