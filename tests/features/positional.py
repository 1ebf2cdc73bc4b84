"""Positional schemes (issue: positional schemes)."""

from harness import register

register("rotary", layers=dict(rotary_pos_emb=True), group="relpos")
register("rotary_partial", layers=dict(rotary_pos_emb=True, rotary_emb_dim=4), group="relpos")
register("alibi", layers=dict(alibi_pos_bias=True), group="relpos")
register("alibi_some_heads", layers=dict(alibi_pos_bias=True, alibi_num_heads=2), group="relpos")
register("t5_rel_pos", layers=dict(rel_pos_bias=True), group="relpos")
register("scaled_sinu", wrapper=dict(scaled_sinu_pos_emb=True), group="abspos")
register("no_positions", wrapper=dict(use_abs_pos_emb=False), group="abspos")
register("sinusoidal", wrapper=dict(sinusoidal_pos_emb=True), group="abspos")
register("tupe", layers=dict(tupe=True, tupe_max_seq_len=64), group="relpos")
register("tupe_cls", layers=dict(tupe=True, tupe_max_seq_len=64, tupe_untie_cls=True), group="relpos")
register("tupe_r", layers=dict(tupe=True, tupe_max_seq_len=64, tupe_untie_cls=True, rel_pos_bias=True), group="relpos")
