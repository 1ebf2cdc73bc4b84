"""TransformerWrapper's upstream options that change the computation (issue 18)."""

from harness import register

# a per-token, per-unit scale of every feed-forward output (ones at init, learned): the properties
# check it under the cache (each new token's own rows), padding and every backend. Its gradient is zero
# at init where a zero-initialised gate follows the feed-forwards (ReZero, LayerScale at 0, zero-init
# branch outputs)
register("ff_deep_embed", wrapper=dict(ff_deep_embed=True), kinds=("decoder", "encoder", "cross"),
         zero_init=("ff_deep_embed",))
