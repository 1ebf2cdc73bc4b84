"""Funnel Transformer (issue 6, 2006.03236).

Kind "funnel" is a TransformerWrapper over FunnelEncoder(depths=(1, 1, 1)) (harness.FUNNEL_DEPTHS).
Every general feature that does not exclude the kind runs on it too; the features here are the
funnel's own keywords. "enc_funnel" puts a funnel encoder under XTransformer (kind "encdec").
"""

from harness import register

F = ("funnel",)

register("funnel_cls", layers=dict(separate_cls=True), kinds=F)
register("funnel_upsample", layers=dict(upsample=True), kinds=F, group="funnel_upsample")
register("funnel_upsample_3", layers=dict(upsample=True, upsample_depth=3), kinds=F, group="funnel_upsample")
register("enc_funnel", layers=dict(enc_funnel=True, enc_depths=(1, 1)), kinds=("encdec",), group="enc_funnel")
register("enc_funnel_upsample", layers=dict(enc_funnel=True, enc_depths=(1, 1), enc_upsample=True,
                                            enc_separate_cls=True), kinds=("encdec",), group="enc_funnel")
