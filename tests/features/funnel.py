"""Funnel Transformer (issue 6, 2006.03236).

Kind "funnel" is a TransformerWrapper over FunnelEncoder(depths=(1, 1, 1)) (harness.FUNNEL_DEPTHS);
its features combine only with each other. "enc_funnel" puts a funnel encoder under XTransformer
(kind "encdec"), so it combines with every encdec feature.
"""

from harness import register

F = ("funnel",)

register("funnel_pool", kinds=F)
register("funnel_cls", layers=dict(separate_cls=True), kinds=F)
register("funnel_upsample", layers=dict(upsample=True), kinds=F, group="funnel_upsample")
register("funnel_upsample_3", layers=dict(upsample=True, upsample_depth=3), kinds=F, group="funnel_upsample")
register("funnel_rotary", layers=dict(rotary_pos_emb=True), kinds=F, group="funnel_relpos")
register("funnel_alibi", layers=dict(alibi_pos_bias=True), kinds=F, group="funnel_relpos")
register("funnel_t5_rel_pos", layers=dict(rel_pos_bias=True), kinds=F, group="funnel_relpos")
register("funnel_kv_heads", layers=dict(attn_kv_heads=2), kinds=F)
register("funnel_mem_kv", layers=dict(attn_num_mem_kv=2), kinds=F)
register("funnel_talking_heads", layers=dict(attn_talking_heads=True), kinds=F)
register("funnel_post_norm", layers=dict(pre_norm=False), kinds=F, group="funnel_placement")
register("funnel_rezero", layers=dict(use_rezero=True), kinds=F, group="funnel_placement")
register("funnel_macaron", layers=dict(macaron=True), kinds=F)
register("enc_funnel", layers=dict(enc_funnel=True, enc_depths=(1, 1)), kinds=("encdec",), group="enc_funnel")
register("enc_funnel_upsample", layers=dict(enc_funnel=True, enc_depths=(1, 1), enc_upsample=True,
                                            enc_separate_cls=True), kinds=("encdec",), group="enc_funnel")
