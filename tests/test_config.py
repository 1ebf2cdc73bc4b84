"""Validation at construction and at call time: every error names what to change."""

import pytest
import torch

from x_transformers import ConfigConflictError, Decoder, Encoder, TransformerWrapper, XTransformer


def test_unknown_keyword_names_closest():
    with pytest.raises(TypeError, match=r"'rotary_pos_embb'.*'rotary_pos_emb'"):
        Decoder(dim=32, depth=1, heads=4, rotary_pos_embb=True)
    with pytest.raises(TypeError, match=r"'attn_num_mem_k'.*'attn_num_mem_kv'"):
        Encoder(dim=32, depth=1, heads=4, attn_num_mem_k=2)
    with pytest.raises(TypeError, match=r"'ff_gluu'.*'ff_glu'"):
        Encoder(dim=32, depth=1, heads=4, ff_gluu=True)
    with pytest.raises(TypeError, match=r"'num_memory_token'.*'num_memory_tokens'"):
        TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Encoder(dim=32, depth=1, heads=4),
                           num_memory_token=2)
    with pytest.raises(TypeError, match=r"'dec_rotary_pos_embb'|'rotary_pos_embb'"):
        XTransformer(dim=32, depth=1, heads=4, num_tokens=10, max_seq_len=8, dec_rotary_pos_embb=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=32, depth=0, heads=4), r"depth must be an integer >= 1"),
    (dict(dim=32, depth=1, heads=4, attn_kv_heads=3), r"attn_kv_heads \(3\) must divide heads \(4\)"),
    (dict(dim=32, depth=1, heads=4, attn_dropout=1.5), r"attn_dropout must be a probability"),
    (dict(dim=32, depth=1, heads=4, ff_activation="gelux"), r"ff_activation must be one of"),
    (dict(dim=32, depth=1, heads=4, attn_dim_head=8, rotary_pos_emb=True, rotary_emb_dim=16),
     r"rotary_emb_dim \(16\) must be at most"),
    (dict(dim=32, depth=2, heads=4, sandwich_coef=3), r"sandwich_coef \(3\) must be at most depth"),
    (dict(dim=32, depth=1, heads=4, custom_layers=("a", "x")), r"custom_layers must be a sequence"),
])
def test_impossible_values_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Encoder(**kwargs)


def test_free_dim_head_lifts_divisibility():
    layers = Encoder(dim=30, depth=1, heads=4, attn_dim_head=7)
    assert layers.blocks[0].fn.to_q.out_features == 28


@pytest.mark.parametrize("kwargs, a, b", [
    (dict(use_scalenorm=True, use_rmsnorm=True), "use_scalenorm", "use_rmsnorm"),
    (dict(alibi_pos_bias=True, rel_pos_bias=True), "alibi_pos_bias", "rel_pos_bias"),
    (dict(use_rezero=True, sandwich_norm=True), "use_rezero", "sandwich_norm"),
    (dict(attn_use_entmax15=True, attn_entmax_alpha=1.3), "attn_use_entmax15", "attn_entmax_alpha"),
    (dict(attn_shared_qk=True, attn_kv_heads=2), "attn_shared_qk", "attn_kv_heads"),
])
def test_conflicts_name_both_keywords(kwargs, a, b):
    with pytest.raises(ConfigConflictError) as info:
        Encoder(dim=32, depth=2, heads=4, **kwargs)
    assert a in str(info.value) and b in str(info.value)


def test_encoder_and_decoder_refuse_wrong_causality():
    with pytest.raises(ValueError, match="Decoder"):
        Encoder(dim=32, depth=1, heads=4, causal=True)
    with pytest.raises(ValueError, match="Encoder"):
        Decoder(dim=32, depth=1, heads=4, causal=False)


def small_lm(**kw):
    return TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=4), **kw)


def test_token_ids_out_of_range_raise_before_embedding():
    model = small_lm()
    with pytest.raises(ValueError, match=r"token id 10 is outside \[0, 10\)"):
        model(torch.tensor([[1, 2, 10]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="must be integers"):  # (floats holding whole numbers are ids, as upstream)
        model(torch.rand(1, 3))


def test_sequence_longer_than_max_seq_len_raises():
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_seq_len \(8\)"):
        small_lm()(torch.zeros(1, 9, dtype=torch.long))


def test_no_cap_without_absolute_positions():
    model = TransformerWrapper(num_tokens=10, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=4, rotary_pos_emb=True))
    assert torch.isfinite(model(torch.zeros(1, 32, dtype=torch.long))).all()


@pytest.mark.parametrize("mask", [torch.ones(1, 4, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool),
                                  torch.ones(4, dtype=torch.bool)])
def test_bad_mask_says_expected_shape(mask):
    with pytest.raises(ValueError, match=r"bool tensor of shape \(1, 4\)"):
        small_lm()(torch.zeros(1, 4, dtype=torch.long), mask)


def test_context_errors():
    dec = Decoder(dim=32, depth=1, heads=4, cross_attend=True)
    with pytest.raises(ValueError, match="pass context"):
        dec(torch.randn(1, 3, 32))
    enc = Encoder(dim=32, depth=1, heads=4)
    with pytest.raises(ValueError, match="cross_attend=True"):
        enc(torch.randn(1, 3, 32), context=torch.randn(1, 2, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, seq, 32\)"):
        enc(torch.randn(1, 3, 16))


# --- bad input: one-line errors naming the keyword, raised at construction (issue 16) ---

def _bad_value_for(f):
    kinds = str(f.type).replace(" ", "").split("|")
    if "bool" in kinds:
        return "no"  # a string would read as truthy
    if "int" in kinds or "float" in kinds:
        return True  # a bool where a number is expected
    return None


def _typed_fields():
    from dataclasses import fields

    from x_transformers.config import AttentionConfig, FeedForwardConfig, LayersConfig

    for cls, prefix in ((LayersConfig, ""), (AttentionConfig, "attn_"), (FeedForwardConfig, "ff_")):
        for f in fields(cls):
            # causal is consumed by Decoder / Encoder themselves (layers.py) before the config sees it
            if f.name not in ("dim", "depth", "heads", "causal") and _bad_value_for(f) is not None:
                yield prefix + f.name, _bad_value_for(f)


@pytest.mark.parametrize("key, value", list(_typed_fields()))
def test_every_bool_and_number_keyword_refuses_a_wrong_type(key, value):
    with pytest.raises(ValueError, match=rf"^{key} must be") as info:
        Decoder(dim=32, depth=1, heads=4, **{key: value})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rotary_pos_emb="no"), r"rotary_pos_emb must be True or False, got 'no'"),
    (dict(ff_mult="4"), r"ff_mult must be a number, got '4'"),
    (dict(heads=4.0), r"heads must be an integer"),
    (dict(norm_eps=0.0), r"norm_eps must be a positive finite number"),
    (dict(norm_eps=-1e-5), r"norm_eps must be a positive finite number"),
    (dict(rotary_pos_emb=True, rotary_base=0.0), r"rotary_base must be a positive finite number"),
    (dict(rotary_pos_emb=True, rotary_base=float("nan")), r"rotary_base must be a positive finite number"),
    (dict(rotary_emb_dim=4), r"rotary_emb_dim configures rotary_pos_emb, which is off; set rotary_pos_emb=True"),
    (dict(rotary_base=10000.0), r"rotary_base configures rotary_pos_emb"),  # the default, given: still given
    (dict(rotary_pos_emb=False, rotary_base=500.0), r"rotary_base configures rotary_pos_emb"),
    (dict(alibi_num_heads=2), r"alibi_num_heads configures alibi_pos_bias"),
    (dict(rel_pos_num_buckets=32), r"rel_pos_num_buckets configures rel_pos_bias"),
    (dict(rel_pos_max_distance=64), r"rel_pos_max_distance configures rel_pos_bias"),
    (dict(tupe_untie_cls=False), r"tupe_untie_cls configures tupe"),
    # (once silently ignored: without QK-norm there is no learned logit scale for it to start)
    (dict(attn_qk_norm_scale=5.0), r"attn_qk_norm_scale configures attn_qk_norm, which is off"),
    (dict(attn_qk_norm=False, attn_qk_norm_scale=10.0), r"attn_qk_norm_scale configures attn_qk_norm"),
])
def test_bad_input_is_refused_at_construction_naming_the_keyword(kwargs, message):
    kwargs = {"heads": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        Decoder(dim=32, depth=1, **kwargs)


def test_sub_keywords_with_their_feature_are_accepted():
    Decoder(dim=32, depth=1, heads=4, rotary_pos_emb=True, rotary_base=500.0, rotary_emb_dim=4)
    Decoder(dim=32, depth=1, heads=4, alibi_pos_bias=True, alibi_num_heads=2)
    Decoder(dim=32, depth=1, heads=4, rel_pos_bias=True, rel_pos_num_buckets=16, rel_pos_max_distance=64)
    qk = Decoder(dim=32, depth=1, heads=4, attn_qk_norm=True, attn_qk_norm_scale=5.0)
    assert torch.all(qk.blocks[0].fn.qk_scale == 5.0)
    # a shared sub-keyword serves the XTransformer side whose feature is on
    model = XTransformer(dim=32, depth=1, heads=4, num_tokens=10, max_seq_len=8, rotary_base=500.0,
                         dec_rotary_pos_emb=True)
    assert model.decoder.attn_layers.rotary is not None and model.encoder.attn_layers.rotary is None
    with pytest.raises(ValueError, match="rotary_base configures rotary_pos_emb"):
        XTransformer(dim=32, depth=1, heads=4, num_tokens=10, max_seq_len=8, rotary_base=500.0)


def test_wrapper_keywords_are_a_validated_dataclass():
    from dataclasses import fields

    from x_transformers.config import WRAPPER_KEYS, WrapperConfig
    from x_transformers.wrappers import WRAPPER_KEYS as REEXPORTED

    assert WRAPPER_KEYS == REEXPORTED == tuple(f.name for f in fields(WrapperConfig))
    layers = Encoder(dim=32, depth=1, heads=4)
    for bad, message in ((dict(num_tokens="10"), r"num_tokens must be an integer"),
                         (dict(tie_embedding="yes"), r"tie_embedding must be True or False"),
                         (dict(logits_scale=float("nan")), r"logits_scale must be a positive finite number"),
                         (dict(emb_dropout=1.0), r"emb_dropout must be a probability")):
        with pytest.raises(ValueError, match=message):
            TransformerWrapper(attn_layers=layers, **{"num_tokens": 10, "max_seq_len": 8, **bad})
    with pytest.raises(TypeError, match="needs num_tokens"):
        TransformerWrapper(attn_layers=layers, max_seq_len=8)
    wrapper = TransformerWrapper(attn_layers=layers, num_tokens=10, max_seq_len=8, emb_dim=16)
    assert wrapper.cfg == WrapperConfig(num_tokens=10, max_seq_len=8, emb_dim=16)
