"""Upstream keyword names and defaults (aliases.py): each alias builds the model its target builds,
every model kind resolves them, not-yet features are accepted only at upstream's default, and
parameter counts equal the real upstream package's for shared configurations."""

import pytest
import torch

import upstream
from x_transformers import (CrossAttender, Decoder, Encoder, TransformerWrapper,
                            XTransformer)
from x_transformers.aliases import ALIASES, NO_OPS, NOT_YET
from x_transformers.config import AttentionConfig, FeedForwardConfig, LayersConfig, WRAPPER_KEYS, field_names
from x_transformers.funnel import FunnelEncoder
from x_transformers.layers import AttentionLayers
from x_transformers.wrappers import MODULE_KEYS

DIM = 32


def build(layers_cls=Decoder, wrapper=None, seed=0, **layer_kwargs):
    torch.manual_seed(seed)
    layers = layers_cls(dim=DIM, depth=2, heads=4, **layer_kwargs)
    return TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=layers, **(wrapper or {}))


def same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randint(0, 20, (2, 9))
    assert torch.equal(a.eval()(x), b.eval()(x))


# ---------------------------------------------------------------------------------------------
# aliases: the upstream spelling builds exactly the model our spelling builds

@pytest.mark.parametrize("theirs, ours", [
    (dict(attn_one_kv_head=True), dict(attn_kv_heads=1)),
    (dict(attn_one_kv_head=False), dict()),
    (dict(ff_swish=True), dict(ff_activation="swish")),
    (dict(ff_swish=True, ff_glu=True), dict(ff_activation="swish", ff_glu=True)),
    (dict(ff_relu_squared=True), dict(ff_activation="relu_squared")),
    (dict(ff_relu_squared=False, ff_activation="relu"), dict(ff_activation="relu")),
    (dict(attn_flash=True), dict()),
    (dict(attn_flash=False), dict()),
    (dict(verbose=False), dict()),
    (dict(norm_add_unit_offset=True), dict()),
    (dict(norm_add_unit_offset=False), dict()),
    (dict(attn_gate_values=False, ff_post_act_ln=False, shift_tokens=0, rotary_xpos=False), dict()),
])
def test_alias_builds_the_targets_model(theirs, ours):
    same_model(build(**theirs), build(**ours))


def test_cross_attn_dim_context_is_dim_context():
    a = build(cross_attend=True, cross_attn_dim_context=24)
    b = build(cross_attend=True, dim_context=24)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and sa.keys() == sb.keys()
    assert a.attn_layers.blocks[1].fn.to_k.in_features == 24  # the cross-attention block reads 24 wide


def test_tie_embedding_scale_is_the_tied_logits_scale():
    x = torch.randint(0, 20, (2, 9))
    a = build(wrapper=dict(tie_embedding=True, tie_embedding_scale=0.5)).eval()
    b = build(wrapper=dict(tie_embedding=True, logits_scale=0.5)).eval()
    assert torch.equal(a(x), b(x))
    assert torch.allclose(a(x), a(x, return_embeddings=True) @ a.token_emb.weight.t() * 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="tie_embedding_scale.*tie_embedding=True"):
        build(wrapper=dict(tie_embedding_scale=0.5))


@pytest.mark.parametrize("kwargs, a, b", [
    (dict(attn_one_kv_head=True, attn_kv_heads=2), "attn_one_kv_head", "attn_kv_heads"),
    (dict(ff_swish=True, ff_activation="gelu"), "ff_swish", "ff_activation"),
    (dict(ff_swish=True, ff_relu_squared=True), "ff_swish", "ff_relu_squared"),
    (dict(cross_attend=True, cross_attn_dim_context=8, dim_context=8), "cross_attn_dim_context", "dim_context"),
])
def test_alias_with_its_target_is_refused_naming_both(kwargs, a, b):
    with pytest.raises(TypeError) as info:
        Decoder(dim=DIM, depth=1, heads=4, **kwargs)
    assert a in str(info.value) and b in str(info.value)


def test_alias_refuses_non_bool_flag():
    with pytest.raises(ValueError, match="attn_one_kv_head must be True or False"):
        Decoder(dim=DIM, depth=1, heads=4, attn_one_kv_head=1)
    with pytest.raises(ValueError, match="attn_flash must be bool"):
        Decoder(dim=DIM, depth=1, heads=4, attn_flash="yes")


# every model kind resolves the table
def _kv_heads(module):
    from x_transformers.attention import Attention
    return {m.kv_heads for m in module.modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("make", [
    lambda **k: Encoder(dim=DIM, depth=1, heads=4, **k),
    lambda **k: Decoder(dim=DIM, depth=1, heads=4, **k),
    lambda **k: CrossAttender(dim=DIM, depth=1, heads=4, **k),
    lambda **k: AttentionLayers(dim=DIM, depth=1, heads=4, causal=True, **k),
    lambda **k: FunnelEncoder(dim=DIM, depths=(1, 1), heads=4, **k),
    lambda **k: XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, **k),
    lambda **k: XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16,
                             **{f"enc_{a}": v for a, v in k.items()}, **{f"dec_{a}": v for a, v in k.items()}),
], ids=["encoder", "decoder", "cross", "layers", "funnel", "xtransformer", "xtransformer-prefixed"])
def test_every_model_kind_resolves_aliases(make):
    assert _kv_heads(make(attn_one_kv_head=True)) == {1}
    assert _kv_heads(make()) == {4}
    with pytest.raises(ValueError, match="attn_onnxable=True.*not implemented"):
        make(attn_onnxable=True)


def test_xtransformer_per_side_alias_and_conflict():
    m = XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, dec_attn_one_kv_head=True)
    assert _kv_heads(m.encoder) == {4} and _kv_heads(m.decoder) == {1}
    with pytest.raises(TypeError, match="enc_attn_one_kv_head.*enc_attn_kv_heads"):
        XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, enc_attn_one_kv_head=True,
                     enc_attn_kv_heads=2)
    # upstream XTransformer's own loss keywords: at their defaults, or with return_loss=True
    XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, ignore_index=-100, pad_value=0)
    with pytest.raises(ValueError, match="ignore_index applies to the loss.*return_loss=True"):
        XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, ignore_index=0)
    XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, ignore_index=0, return_loss=True)


# ---------------------------------------------------------------------------------------------
# not-yet features: upstream's default is a no-op, anything else raises naming the keyword

def _value_other_than(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 1
    if isinstance(default, dict):
        return {"x": 1}
    return 2  # None -> a value


@pytest.mark.parametrize("entry", list(NOT_YET.values()), ids=lambda e: f"{e.scope}:{e.name}")
def test_not_yet_accepted_only_at_upstreams_default(entry):
    def make(value):
        if entry.scope == "layers":
            return build(**{entry.name: value})
        if entry.scope == "wrapper":
            return build(wrapper={entry.name: value})
        return XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, **{entry.name: value})
    if entry.scope != "xtransformer":
        same_model(make(entry.default), build())
    else:
        make(entry.default)
    with pytest.raises(ValueError) as info:
        make(_value_other_than(entry.default))
    assert entry.name in str(info.value) and "not implemented" in str(info.value)


def test_tables_do_not_overlap_our_names():
    ours = (field_names(LayersConfig) | {"attn_" + n for n in field_names(AttentionConfig)}
            | {"ff_" + n for n in field_names(FeedForwardConfig)} | set(WRAPPER_KEYS))
    upstream_only = set(ALIASES) | set(NO_OPS) | {name for _, name in NOT_YET}
    assert not ours & upstream_only
    assert all(a.target in ours for a in ALIASES.values())


# ---------------------------------------------------------------------------------------------
# completeness and parameter counts against the real upstream package

def _our_names() -> set[str]:
    return (field_names(LayersConfig) | {"attn_" + n for n in field_names(AttentionConfig)}
            | {"ff_" + n for n in field_names(FeedForwardConfig)} | set(WRAPPER_KEYS) | {"attn_layers"} | set(MODULE_KEYS))


def classify(sig: dict[str, list[str]]) -> dict[str, set[str]]:
    """Upstream's constructor keywords, as a user passes them, by how we take them."""
    names = ({"attn_" + n for n in sig["attn"] if n not in ("dim", "heads", "causal")}  # AttentionLayers sets these
             | set(sig["layers"]) | {"ff_" + n for n in sig["ff"] if n != "dim"} | set(sig["wrapper"]))
    not_yet = {name for _, name in NOT_YET}
    out = {"ours": names & _our_names(), "alias": names & set(ALIASES), "no-op": names & set(NO_OPS),
           "default only": names & not_yet}
    out["unhandled"] = names - set().union(*out.values())
    return out


def test_every_upstream_constructor_keyword_is_handled():
    groups = classify(upstream.upstream_signatures())
    assert not groups["unhandled"], sorted(groups["unhandled"])
    # the two counts reported in docs/migration.md
    print({k: len(v) for k, v in groups.items()})


BASE = dict(dim=128, depth=2, heads=8)
CASES = [  # (layers class, layer keywords, wrapper keywords): same keywords on both sides
    ("Decoder", {}, {}),
    ("Encoder", {}, {}),
    ("Decoder", dict(rotary_pos_emb=True), {}),
    ("Decoder", dict(alibi_pos_bias=True), {}),
    ("Decoder", dict(rel_pos_bias=True), {}),
    ("Decoder", dict(attn_kv_heads=2), {}),
    ("Decoder", dict(attn_one_kv_head=True), {}),
    ("Decoder", dict(ff_glu=True, ff_swish=True), {}),
    ("Decoder", dict(ff_no_bias=True, ff_relu_squared=True, ff_mult=2), {}),
    ("Decoder", dict(use_rmsnorm=True), {}),
    ("Decoder", dict(use_scalenorm=True), {}),
    ("Decoder", dict(use_simple_rmsnorm=True), {}),
    ("Decoder", {}, dict(tie_embedding=True)),
    ("Decoder", dict(attn_num_mem_kv=4), dict(num_memory_tokens=3)),
    ("Decoder", {}, dict(emb_dim=64)),
    ("Encoder", dict(macaron=True), {}),
    ("Decoder", dict(sandwich_norm=True), {}),
    ("Decoder", {}, dict(max_seq_len=0)),
    ("Decoder", dict(attn_dim_head=32, heads=4), {}),
    ("Encoder", dict(pre_norm=False), {}),
    ("Decoder", dict(cross_attend=True, cross_attn_dim_context=96), {}),
    ("CrossAttender", {}, {}),
    ("Decoder", {}, dict(logits_dim=10)),
    ("Decoder", dict(pre_norm_has_final_norm=False), {}),
    ("Encoder", dict(sandwich_coef=1, depth=3), {}),
    ("Encoder", dict(sandwich_coef=1, depth=3, macaron=True), {}),
    ("Decoder", dict(disable_abs_pos_emb=True), {}),
    ("Decoder", dict(rotary_pos_emb=True, disable_abs_pos_emb=False), {}),
    ("Decoder", {}, dict(scaled_sinu_pos_emb=True)),
    ("Decoder", dict(attn_flash=True, attn_dim_head=16), dict(emb_dropout=0.1)),
    ("Encoder", dict(custom_layers=("a", "f", "f", "a")), {}),
    # issue 20's variants with parameters of their own
    ("Decoder", dict(add_value_residual=True, depth=3), {}),
    ("Decoder", dict(attn_value_dim_head=32, attn_qk_norm=True, attn_qk_norm_dim_scale=True), {}),
    ("Decoder", dict(attn_use_latent_q=True, attn_dim_latent_q=48, attn_use_latent_kv=True, attn_dim_latent_kv=40,
                     attn_latent_rope_subheads=2, rotary_pos_emb=True), {}),
    ("Decoder", dict(attn_pre_scale_post_talking_heads=True), {}),
]
XT_CASE = dict(dim=128, enc_num_tokens=256, enc_depth=2, enc_heads=4, enc_max_seq_len=64, dec_num_tokens=300,
               dec_depth=2, dec_heads=4, dec_max_seq_len=32, tie_token_emb=False)


def _ours(kind, layers, wrapper):
    cls = dict(Decoder=Decoder, Encoder=Encoder, CrossAttender=CrossAttender)[kind]
    model = TransformerWrapper(attn_layers=cls(**{**BASE, **layers}), **{"num_tokens": 256, "max_seq_len": 64,
                                                                          **wrapper})
    return sum(p.numel() for p in model.parameters())


def _payload(kind, layers, wrapper):
    return dict(kind=kind, layers={**BASE, **layers}, wrapper={"num_tokens": 256, "max_seq_len": 64, **wrapper})


def test_parameter_counts_equal_upstreams():
    cases = [_payload(*c) for c in CASES] + [dict(kind="XTransformer", kwargs=XT_CASE)]
    theirs = upstream.upstream_param_counts(cases)
    ours = [_ours(*c) for c in CASES] + [sum(p.numel() for p in XTransformer(**XT_CASE).parameters())]
    assert theirs[0] == 862_080 == ours[0]
    mismatched = [(c, o, t) for c, o, t in zip(CASES + [("XTransformer", XT_CASE, {})], ours, theirs) if o != t]
    assert not mismatched


# ---------------------------------------------------------------------------------------------
# upstream's defaults for shared keywords

def test_upstream_defaults():
    layers = Decoder(dim=DIM, depth=1, heads=4, rotary_pos_emb=True)
    attn = layers.blocks[0].fn
    assert attn.dim_head == 64 and attn.to_q.out_features == 4 * 64  # head dimension 64, not dim // heads
    assert layers.rotary.rot_dim == 32  # half the head dimension
    assert layers.blocks[0].pre_norm.bias is None  # bias-less LayerNorm
    alibi = TransformerWrapper(num_tokens=20, max_seq_len=16,
                               attn_layers=Decoder(dim=DIM, depth=1, heads=4, alibi_pos_bias=True))
    assert alibi.pos_emb is not None  # ALiBi keeps learned absolute positions, as upstream
    none = TransformerWrapper(num_tokens=20, max_seq_len=0, attn_layers=Decoder(dim=DIM, depth=1, heads=4))
    assert none.pos_emb is None  # max_seq_len=0: no absolute positions
    tied = TransformerWrapper(num_tokens=20, max_seq_len=16, tie_embedding=True,
                              attn_layers=Decoder(dim=DIM, depth=1, heads=4))
    assert tied.logits_scale == DIM ** -0.5  # upstream's tie_embedding_scale
    assert TransformerWrapper(num_tokens=20, max_seq_len=16, num_memory_tokens=None,
                              attn_layers=Decoder(dim=DIM, depth=1, heads=4)).memory_tokens is None


def test_xtransformer_still_returns_logits():
    m = XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16).eval()
    src, tgt = torch.randint(0, 20, (2, 7)), torch.randint(0, 20, (2, 5))
    out = m(src, tgt)
    assert out.shape == (2, 5, 20)
    torch.testing.assert_close(out, m.decoder(tgt, context=m.encode(src)))


def test_xtransformer_return_loss_is_upstreams_loss_and_shares_the_weights():
    """return_loss=True: the next-token cross-entropy of tgt given src, as upstream's forward (its
    decoder is an AutoregressiveWrapper); ignore_index / pad_value as upstream's."""
    torch.manual_seed(0)
    plain = XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16)
    lossy = XTransformer(dim=DIM, depth=1, heads=4, num_tokens=20, max_seq_len=16, return_loss=True, ignore_index=0,
                         pad_value=3)
    assert lossy.state_dict().keys() == plain.state_dict().keys()  # the loss adds no module
    lossy.load_state_dict(plain.state_dict())
    src, tgt = torch.randint(0, 20, (2, 7)), torch.randint(1, 20, (2, 6))
    tgt[1, 2] = 0  # ignored as a target, fed as pad_value 3 as an input
    inp = tgt[:, :-1].masked_fill(tgt[:, :-1] == 0, 3)
    logits = plain(src, inp)
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt[:, 1:], ignore_index=0)
    got = lossy(src, tgt)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    got.backward()
    assert lossy.encoder.attn_layers.blocks[0].fn.to_q.weight.grad.abs().sum() > 0  # through cross-attention
    with pytest.raises(ValueError, match="returns the loss"):
        lossy(src, tgt, return_embeddings=True)


# ---------------------------------------------------------------------------------------------
# docs/migration.md: every deliberate deviation has a row, every row a test; every alias is listed

from pathlib import Path  # noqa: E402

DOC = (Path(__file__).resolve().parent.parent / "docs" / "migration.md").read_text()


def _doc_rows(section: str) -> list[str]:
    body = DOC.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip().strip("`") for line in body.splitlines()
            if line.startswith("| `")]


def _counts_delta(layers_kwargs, wrapper=None):
    """(ours, upstream's) parameter counts for one configuration."""
    case = ("Decoder", layers_kwargs, wrapper or {})
    return _ours(*case), upstream.upstream_param_counts([_payload(*case)])[0]


def _qk_norm_scale():
    ours, theirs = _counts_delta(dict(attn_qk_norm=True))
    assert ours - theirs == BASE["depth"] * BASE["heads"]  # one learned scale per head and layer
    # attn_scale fixes the scale, as upstream's constant: upstream's parameter count
    assert _ours("Decoder", dict(attn_qk_norm=True, attn_scale=10.0), {}) == theirs


def _single_head_out():
    ours, theirs = _counts_delta(dict(heads=1, attn_dim_head=BASE["dim"]))
    assert ours - theirs == BASE["depth"] * BASE["dim"] ** 2  # our output projections


def _glu_no_bias():
    ours, theirs = _counts_delta(dict(ff_glu=True, ff_no_bias=True))
    inner = 4 * BASE["dim"]
    assert theirs - ours == BASE["depth"] * 2 * inner  # upstream keeps the GLU projection's bias
    ff = Decoder(dim=DIM, depth=1, heads=4, ff_glu=True, ff_no_bias=True).blocks[1].fn
    assert ff.proj_in.bias is None and ff.proj_out.bias is None


def _xtransformer_logits():
    test_xtransformer_still_returns_logits()


def _norm_gain():
    layers = Decoder(dim=DIM, depth=1, heads=4, norm_add_unit_offset=True)
    assert torch.equal(layers.blocks[0].pre_norm.weight, torch.ones(DIM))  # stored directly, at 1
    same_model(build(norm_add_unit_offset=True), build(norm_add_unit_offset=False))


def _rmsnorm_eps():
    norm = Decoder(dim=DIM, depth=1, heads=4, use_rmsnorm=True).blocks[0].pre_norm
    x = torch.randn(3, DIM)
    theirs = torch.nn.functional.normalize(x, dim=-1) * DIM ** 0.5  # upstream's, gain 1
    assert torch.allclose(norm(x), theirs, atol=1e-4)
    tiny = torch.full((1, DIM), 1e-4)
    assert norm(tiny).abs().max() < 0.1  # eps dominates near zero, where upstream's output is all ones
    assert Decoder(dim=DIM, depth=1, heads=4, use_rmsnorm=True, norm_eps=1e-3).blocks[0].pre_norm.eps == 1e-3


def _sinusoidal_kept():
    m = TransformerWrapper(num_tokens=20, max_seq_len=0, scaled_sinu_pos_emb=True,
                           attn_layers=Decoder(dim=DIM, depth=1, heads=4, rotary_pos_emb=True))
    assert m.pos_emb is not None and m.pos_emb.scale is not None


def _init():
    torch.manual_seed(0)
    m = TransformerWrapper(num_tokens=4000, max_seq_len=512, attn_layers=Decoder(dim=64, depth=1, heads=4))
    assert abs(m.token_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(m.pos_emb.emb.weight.std().item() - 0.02) < 1e-3


def _rotary_even():
    layers = Decoder(dim=DIM, depth=1, heads=4, attn_dim_head=6, rotary_pos_emb=True)
    assert layers.rotary.rot_dim == 2  # 6 // 2 = 3, rounded down to an even count


def _max_seq_len_optional():
    m = TransformerWrapper(num_tokens=20, attn_layers=Decoder(dim=DIM, depth=1, heads=4, rotary_pos_emb=True))
    assert m.pos_emb is None
    assert m(torch.randint(0, 20, (1, 40))).shape == (1, 40, 20)
    with pytest.raises(ValueError, match="need max_seq_len"):
        TransformerWrapper(num_tokens=20, attn_layers=Decoder(dim=DIM, depth=1, heads=4))


def _ff_softclamp_glu():
    ff = Decoder(dim=DIM, depth=1, heads=4, ff_glu=True, ff_softclamp_value=2.0).blocks[1].fn
    h = torch.randn(3, 8 * DIM) * 10
    up, gate = (2.0 * torch.tanh(h / 2.0)).chunk(2, dim=-1)
    torch.testing.assert_close(ff._activate(h), up * torch.nn.functional.gelu(gate))


def _glu_clamp_values():
    assert FeedForwardConfig(glu=True, glu_gate_softclamp_value=10.0).glu_softclamp_on
    assert FeedForwardConfig(glu=True, glu_up_softclamp_value=10.0).glu_softclamp_on
    assert not FeedForwardConfig(glu=True).glu_softclamp_on


def _execute_order_unused():
    ours, theirs = _counts_delta(dict(layers_execute_order=(0, 1)))
    one_unit, _ = _counts_delta(dict(depth=1))
    two_units, _ = _counts_delta({})
    assert theirs - ours == two_units - one_unit  # upstream keeps the unit that never runs


def _branch_scale_after_sandwich():
    model = Encoder(dim=DIM, depth=2, heads=4, sandwich_norm=True, use_layerscale=True).eval()
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(model(x), model.final_norm(x))  # gamma = 0 closes every branch


def _gru_skip_constant():
    block = Encoder(dim=DIM, depth=1, heads=4, gate_residual=True, scale_residual_constant=0.5).blocks[1]
    x = torch.randn(2, 5, DIM)
    out = block.fn(block.pre_norm(x))
    expected = block.gru(out.reshape(-1, DIM), 0.5 * x.reshape(-1, DIM)).view_as(x)
    torch.testing.assert_close(block(x)[0], expected)


def _xpos_uncentred():
    rot = Decoder(dim=DIM, depth=1, heads=4, rotary_xpos=True).rotary
    scale = rot(torch.arange(3, 9)[None])[2][0, 0]  # (n, r): zeta ** (position / 512), position 3 first
    torch.testing.assert_close(scale, rot.xpos_zeta.repeat(2) ** (torch.arange(3, 9)[:, None] / 512.0))


def _earlier_outputs_ignore_later_tokens(**kw):
    model = Decoder(dim=DIM, depth=2, heads=4, **kw).eval()
    x = torch.randn(1, 6, DIM)
    later = torch.cat((x[:, :4], torch.randn(1, 2, DIM)), dim=1)
    torch.testing.assert_close(model(x)[:, :4], model(later)[:, :4])


def _mla_cache():
    from x_transformers.cache import KVCache

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=1, heads=4, attn_dim_head=8, attn_use_latent_kv=True, attn_dim_latent_kv=6,
        attn_latent_rope_subheads=1, rotary_pos_emb=True)).eval()
    x = torch.randint(0, 20, (2, 5))
    cache = KVCache()
    steps = [net(x[:, :2], cache=cache)] + [net(x[:, t:t + 1], cache=cache) for t in range(2, 5)]
    torch.testing.assert_close(torch.cat(steps, 1), net(x))
    layer = cache.layer(0)  # the projected, rotated keys and the values per head, not the 6-wide latent
    assert layer.k.shape == (2, 4, 5, 8) and layer.v.shape == (2, 4, 5, 8)


def _hybrid_no_fold():
    from torch.nn import GRU

    torch.manual_seed(0)
    kw = dict(dim=DIM, depth=1, heads=4, attn_dim_head=8, attn_hybrid_module=GRU(DIM, DIM, batch_first=True))
    unfolded, folded = Decoder(**kw).eval(), Decoder(attn_hybrid_fold_axial_dim=1, **kw).eval()
    folded.load_state_dict(unfolded.state_dict())
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(unfolded(x), folded(x))


def _stack_pos_integer():
    net = Decoder(dim=DIM, depth=1, heads=4, rotary_pos_emb=True)
    with pytest.raises(ValueError, match="integer tensor"):
        net(torch.randn(1, 3, DIM), pos=torch.tensor([0.0, 0.5, 1.0]))


def _context_pos_needs_rotary():
    net = Decoder(dim=DIM, depth=1, heads=4, cross_attend=True)
    with pytest.raises(ValueError, match="needs rotary_pos_emb"):
        net(torch.randn(1, 3, DIM), context=torch.randn(1, 2, DIM), context_pos=torch.arange(2))


def _lime_first_block():
    soft = Decoder(dim=DIM, depth=2, heads=4, integrate_layers=True)
    assert soft.blocks[0].integrate is None and soft.blocks[1].integrate.layers == 2
    relu = Decoder(dim=DIM, depth=2, heads=4, integrate_layers=True, layer_integrate_use_softmax=False)
    assert relu.blocks[0].integrate.layers == 1  # ReLU weights scale the one input: built


def _dim_condition_alone():
    with pytest.raises(ValueError, match="dim_condition configures"):
        Decoder(dim=DIM, depth=1, heads=4, dim_condition=8)
    Decoder(dim=DIM, depth=1, heads=4, dim_condition=8, use_adaptive_layernorm=True)


DEVIATIONS = {
    "qk-norm-scale": _qk_norm_scale, "single-head-out": _single_head_out, "glu-no-bias": _glu_no_bias,
    "xtransformer-logits": _xtransformer_logits, "norm-gain": _norm_gain, "rmsnorm-eps": _rmsnorm_eps,
    "sinusoidal-kept": _sinusoidal_kept, "init": _init, "rotary-even": _rotary_even,
    "max-seq-len-optional": _max_seq_len_optional, "ff-softclamp-glu": _ff_softclamp_glu,
    "glu-clamp-values": _glu_clamp_values, "execute-order-unused": _execute_order_unused,
    "branch-scale-after-sandwich": _branch_scale_after_sandwich, "gru-skip-constant": _gru_skip_constant,
    "xpos-uncentred": _xpos_uncentred,
    "orthog-per-token": lambda: _earlier_outputs_ignore_later_tokens(orthog_residual=True),
    "orthog-values-per-token": lambda: _earlier_outputs_ignore_later_tokens(
        attn_orthog_projected_values=True, attn_orthog_projected_values_per_head=True),
    "mv-split-prefix-mean": lambda: _earlier_outputs_ignore_later_tokens(mv_split_residual=True),
    "mla-cache": _mla_cache, "hybrid-no-fold": _hybrid_no_fold, "stack-pos-integer": _stack_pos_integer,
    "context-pos-needs-rotary": _context_pos_needs_rotary, "lime-first-block": _lime_first_block,
    "dim-condition-alone": _dim_condition_alone,
}


def test_every_deviation_row_has_a_test():
    assert _doc_rows("Deliberate deviations") == list(DEVIATIONS)


@pytest.mark.parametrize("row", list(DEVIATIONS))
def test_deviation(row):
    DEVIATIONS[row]()


def test_doc_lists_every_alias_and_no_op():
    aliases = {row.split("=")[0] for row in _doc_rows("How upstream's keywords are taken")}
    assert aliases == set(ALIASES) | set(NO_OPS)
    assert str(len(NOT_YET) - len([1 for s, _ in NOT_YET if s == "xtransformer"])) in DOC
