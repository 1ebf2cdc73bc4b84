"""Positional schemes: each scheme's defining property, checked against the paper's formula."""

import math

import pytest
import torch

from harness import FEATURES, load_features, run_properties
from x_transformers import Decoder, Encoder, TransformerWrapper, XTransformer
from x_transformers.attention import Attention
from x_transformers.cache import KVCache
from x_transformers.config import ConfigConflictError
from x_transformers.positional import (AlibiPositionalBias, SinusoidalPositionalEmbedding, T5RelativePositionBias,
                                       TUPEPositionalBias, alibi_slopes, t5_bucket)

DIM, HEADS = 32, 4


def sharpen(model):
    """Scale up query/key projections: at init (std 0.02) attention is near uniform, so positions
    would barely move the output and a 'positions matter' check would prove nothing."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (Attention, TUPEPositionalBias)):
                m.to_q.weight.mul_(15)
                m.to_k.weight.mul_(15)
    return model


def stack(cls=Decoder, **kw):
    torch.manual_seed(0)
    return sharpen(cls(dim=DIM, depth=2, heads=HEADS, **kw).eval())


def lm(max_seq_len=16, cls=Decoder, wrapper=None, **kw):
    torch.manual_seed(0)
    layers = cls(dim=DIM, depth=2, heads=HEADS, **kw)
    return sharpen(TransformerWrapper(num_tokens=20, max_seq_len=max_seq_len, attn_layers=layers, **(wrapper or {})).eval())


def embeddings(n=10, b=2):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# relative schemes: shifting every position by a constant changes nothing


@pytest.mark.parametrize("cls", [Encoder, Decoder])
@pytest.mark.parametrize("kw", [dict(rotary_pos_emb=True), dict(rotary_pos_emb=True, rotary_emb_dim=4),
                                dict(alibi_pos_bias=True), dict(rel_pos_bias=True)],
                         ids=["rotary", "rotary_partial", "alibi", "t5"])
def test_relative_schemes_are_shift_invariant(cls, kw):
    layers, x = stack(cls, **kw), embeddings()
    pos = torch.arange(10)[None]
    ref = layers(x, positions=pos)
    torch.testing.assert_close(layers(x, positions=pos + 37), ref, atol=1e-5, rtol=1e-5)
    # and positions do matter: stretching the offsets changes the output
    assert (layers(x, positions=pos * 3) - ref).abs().max() > 1e-3


def test_tupe_is_absolute_not_shift_invariant():
    layers, x = stack(Encoder, tupe=True, tupe_max_seq_len=64), embeddings()
    pos = torch.arange(10)[None]
    assert (layers(x, positions=pos + 5) - layers(x, positions=pos)).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# ALiBi (2108.12409)


def test_alibi_slopes_match_the_paper():
    assert alibi_slopes(8) == [2.0 ** -k for k in range(1, 9)]  # 2^(-8/n), its powers
    assert alibi_slopes(4) == [2.0 ** -k for k in (2, 4, 6, 8)]
    # not a power of two: the 4-head slopes, then every other of the 8-head slopes
    torch.testing.assert_close(torch.tensor(alibi_slopes(6)), torch.tensor([2.0 ** -k for k in (2, 4, 6, 8, 1, 3)]))


def test_alibi_bias_is_a_linear_distance_penalty():
    bias = AlibiPositionalBias(heads=4, alibi_heads=2)(torch.arange(3)[None], torch.arange(3)[None])
    dist = torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]])
    torch.testing.assert_close(bias[0, 0], -0.0625 * dist)  # slopes for 2 heads: 2^-4, 2^-8
    torch.testing.assert_close(bias[0, 1], -(2 ** -8) * dist)
    assert (bias[0, 2:] == 0).all()  # heads beyond alibi_num_heads see no penalty


@pytest.mark.parametrize("kw", [dict(alibi_pos_bias=True), dict(rotary_pos_emb=True)], ids=["alibi", "rotary"])
def test_trained_at_length_L_runs_at_4L(kw):
    L = 8
    # no absolute table (ALiBi keeps one by default, as upstream): max_seq_len is no cap
    model = lm(max_seq_len=L, wrapper=dict(use_abs_pos_emb=False), **kw).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 20, (8, L + 1), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    long = torch.randint(0, 20, (2, 4 * L))
    out = model(long)
    assert out.shape == (2, 4 * L, 20) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :L], model(long[:, :L]), atol=1e-5, rtol=1e-5)  # causal prefix unchanged


# ---------------------------------------------------------------------------------------------
# T5 relative bias (1910.10683)


def test_t5_buckets_match_the_paper_for_hand_picked_offsets():
    # offsets are key - query; 32 buckets, max distance 128
    rel = torch.tensor([0, -3, 3, -8, -20, 20, -200, 200])
    # bidirectional: 16 per side, 8 exact; 8 + floor(log(n/8) / log(16) * 8) beyond, capped at 15
    bi = [0, 3, 19, 8, 10, 26, 15, 31]
    assert t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).tolist() == bi
    # causal: keys after the query all share bucket 0; 16 exact; 16 + floor(log(n/16) / log(8) * 16)
    rel = torch.tensor([0, 5, -3, -15, -16, -20, -100, -1000])
    causal = [0, 0, 3, 15, 16, 17, 30, 31]
    assert t5_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128).tolist() == causal


def test_t5_bidirectional_in_encoders_causal_in_decoders():
    enc, dec = stack(Encoder, rel_pos_bias=True), stack(Decoder, rel_pos_bias=True)
    assert not enc.rel_pos.causal and dec.rel_pos.causal
    pos = torch.arange(6)[None]
    enc_bias, dec_bias = enc.rel_pos(pos, pos)[0, 0], dec.rel_pos(pos, pos)[0, 0]
    table_e, table_d = enc.rel_pos.relative_attention_bias.weight[:, 0], dec.rel_pos.relative_attention_bias.weight[:, 0]
    # encoder: a key 2 after the query and 2 before use different learned values (buckets 18 and 2)
    assert enc_bias[1, 3] == table_e[18] and enc_bias[3, 1] == table_e[2]
    # decoder: one-sided buckets; every key at or after the query reads bucket 0
    assert dec_bias[3, 1] == table_d[2] and dec_bias[1, 3] == table_d[0] == dec_bias[1, 1]


def test_t5_bias_is_one_table_shared_by_every_layer():
    layers = stack(Decoder, rel_pos_bias=True)
    tables = [n for n, _ in layers.named_parameters() if "relative_attention_bias" in n]
    assert tables == ["rel_pos.relative_attention_bias.weight"]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k: seen.append(k["score_mod"]), with_kwargs=True)
             for m in layers.modules() if isinstance(m, Attention)]
    layers(embeddings())
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0] is not None
    # the one table gets gradient from both layers' use of it
    layers(embeddings()).sum().backward()
    assert layers.rel_pos.relative_attention_bias.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# absolute schemes and no positions


def test_learned_absolute_positions_enforce_max_seq_len():
    model = lm(max_seq_len=8)
    model(torch.randint(0, 20, (1, 8)))
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_seq_len \(8\)"):
        model(torch.randint(0, 20, (1, 9)))
    cache = KVCache()  # decoding past the table is refused too
    model(torch.randint(0, 20, (1, 8)), cache=cache)
    with pytest.raises(ValueError, match=r"exceeds max_seq_len \(8\)"):
        model(torch.randint(0, 20, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="need max_seq_len"):
        TransformerWrapper(num_tokens=20, attn_layers=Decoder(dim=DIM, depth=1, heads=HEADS))


def test_sinusoidal_matches_the_formula():
    dim, pos = 8, torch.tensor([[0, 1, 5, 100]])
    emb = SinusoidalPositionalEmbedding(dim)(pos)[0]
    for row, p in enumerate(pos[0].tolist()):
        for i in range(dim // 2):  # PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(...)
            angle = p / 10000 ** (2 * i / dim)
            # our layout puts all sines first, then all cosines (a fixed permutation of channels)
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert emb[row, dim // 2 + i].item() == pytest.approx(math.cos(angle), abs=1e-5)
    scaled = TransformerWrapper(num_tokens=20, scaled_sinu_pos_emb=True,
                                attn_layers=Decoder(dim=DIM, depth=1, heads=HEADS)).pos_emb
    torch.testing.assert_close(scaled(pos), SinusoidalPositionalEmbedding(DIM)(pos) * DIM ** -0.5)


def test_encoder_without_positions_is_permutation_equivariant():
    model = lm(cls=Encoder, wrapper=dict(use_abs_pos_emb=False))
    assert model.pos_emb is None
    x = torch.randint(0, 20, (2, 9))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model(x[:, perm]), model(x)[:, perm], atol=1e-5, rtol=1e-5)


def test_causal_decoder_without_positions_still_knows_position():
    # [BOS, a, a, a, ...]: an encoder cannot tell the a's apart; a causal decoder can (the causal
    # mask dilutes attention to BOS as 1/t), which is how such models learn position
    x = torch.tensor([[1] + [7] * 7])
    enc, dec = lm(cls=Encoder, wrapper=dict(use_abs_pos_emb=False)), lm(wrapper=dict(use_abs_pos_emb=False))
    e, d = enc(x, return_embeddings=True)[0, 1:], dec(x, return_embeddings=True)[0, 1:]
    torch.testing.assert_close(e, e[:1].expand_as(e), atol=1e-5, rtol=1e-5)
    gaps = (d[:, None] - d[None]).norm(dim=-1) + torch.eye(7) * 1e9
    assert gaps.min() > 1e-3  # every decoder position has its own representation


# ---------------------------------------------------------------------------------------------
# TUPE (2006.15595)


def hand_tupe(untie_cls=False):
    """dim 2, one head of dim 2: p0 = (1, 0), p1 = (0, 1), p2 = (1, 1); U_Q = I, U_K = diag(2, 1)."""
    m = TUPEPositionalBias(dim=2, heads=1, dim_head=2, max_seq_len=3, untie_cls=untie_cls)
    with torch.no_grad():
        m.emb.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1]]))
        m.to_q.weight.copy_(torch.eye(2))
        m.to_k.weight.copy_(torch.tensor([[2.0, 0], [0, 1]]))
        if untie_cls:
            m.cls_theta.copy_(torch.tensor([[-1.0], [3.0]]))  # theta_1, theta_2
    return m


def test_tupe_hand_computed_three_tokens():
    pos = torch.arange(3)[None]
    # p U_Q = p; p U_K = (2, 0), (0, 1), (2, 1); dot products / sqrt(2 * 2)
    want = torch.tensor([[2.0, 0, 2], [0, 1, 1], [2, 1, 3]]) / 2
    torch.testing.assert_close(hand_tupe()(pos, pos)[0, 0], want)
    # untied [CLS]: its row is theta_1, its column (other queries) theta_2
    want_cls = torch.tensor([[-1.0, -1, -1], [3, 0.5, 0.5], [3, 0.5, 1.5]])
    torch.testing.assert_close(hand_tupe(untie_cls=True)(pos, pos)[0, 0], want_cls)
    # TUPE-R: a relative bias joins v_ij before the reset, so [CLS] entries stay theta
    rel = torch.full((1, 1, 3, 3), 10.0)
    want_r = torch.tensor([[-1.0, -1, -1], [3, 10.5, 10.5], [3, 10.5, 11.5]])
    torch.testing.assert_close(hand_tupe(untie_cls=True)(pos, pos, rel)[0, 0], want_r)


def test_tupe_attention_is_word_term_plus_position_term_over_sqrt_2d():
    torch.manual_seed(0)
    layers = Encoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=DIM // HEADS, tupe=True, tupe_max_seq_len=16,
                     tupe_untie_cls=True).eval()
    with torch.no_grad():
        layers.tupe.cls_theta.normal_()
    x = embeddings(n=5, b=1)
    _, (attn,) = layers(x, return_attn=True)
    block = layers.blocks[0]
    h = block.pre_norm(x)
    d = DIM // HEADS
    q = block.fn.to_q(h).view(1, 5, HEADS, d).transpose(1, 2)
    k = block.fn.to_k(h).view(1, 5, HEADS, d).transpose(1, 2)
    pos = torch.arange(5)[None]
    pq = layers.tupe.to_q(layers.tupe.emb(pos)).view(1, 5, HEADS, d).transpose(1, 2)
    pk = layers.tupe.to_k(layers.tupe.emb(pos)).view(1, 5, HEADS, d).transpose(1, 2)
    v = pq @ pk.transpose(-1, -2) / math.sqrt(2 * d)
    theta = layers.tupe.cls_theta
    v[:, :, 1:, 0] = theta[1].view(1, HEADS, 1)
    v[:, :, 0, :] = theta[0].view(1, HEADS, 1)
    want = (q @ k.transpose(-1, -2) / math.sqrt(2 * d) + v).softmax(dim=-1)
    torch.testing.assert_close(attn, want, atol=1e-5, rtol=1e-5)


def test_tupe_with_attn_scale_scales_the_word_term_by_it_and_keeps_the_position_term():
    """attn_scale given: the word-to-word logits take it in place of TUPE's 1/sqrt(2d); the
    position term keeps its own 1/sqrt(2d)."""
    torch.manual_seed(0)
    layers = Encoder(dim=DIM, depth=1, heads=HEADS, attn_dim_head=DIM // HEADS, tupe=True, tupe_max_seq_len=16,
                     attn_scale=0.05).eval()
    x = embeddings(n=5, b=1)
    _, (attn,) = layers(x, return_attn=True)
    block, d = layers.blocks[0], DIM // HEADS
    assert block.fn.cfg.scale == 0.05
    h = block.pre_norm(x)
    q = block.fn.to_q(h).view(1, 5, HEADS, d).transpose(1, 2)
    k = block.fn.to_k(h).view(1, 5, HEADS, d).transpose(1, 2)
    p = layers.tupe.emb(torch.arange(5)[None])
    pq = layers.tupe.to_q(p).view(1, 5, HEADS, d).transpose(1, 2)
    pk = layers.tupe.to_k(p).view(1, 5, HEADS, d).transpose(1, 2)
    want = (q @ k.transpose(-1, -2) * 0.05 + pq @ pk.transpose(-1, -2) / math.sqrt(2 * d)).softmax(dim=-1)
    torch.testing.assert_close(attn, want, atol=1e-5, rtol=1e-5)


def test_tupe_is_shared_across_layers_and_replaces_the_absolute_embedding():
    model = lm(tupe=True, tupe_max_seq_len=16)
    assert model.pos_emb is None  # p_i are not added to the tokens
    names = [n for n, _ in model.named_parameters() if ".tupe." in n]
    assert sorted(names) == ["attn_layers.tupe.emb.weight", "attn_layers.tupe.to_k.weight", "attn_layers.tupe.to_q.weight"]
    assert all(b.fn.cfg.scale == (2 * 64) ** -0.5 for b in model.attn_layers.blocks if isinstance(b.fn, Attention))
    # cross-attention keeps the usual scale
    xt = XTransformer(dim=DIM, depth=1, heads=HEADS, num_tokens=20, max_seq_len=16, tupe=True, tupe_max_seq_len=16)
    scales = {b.fn.cross: b.fn.cfg.scale for b in xt.decoder.attn_layers.blocks if isinstance(b.fn, Attention)}
    assert scales == {False: (2 * 64) ** -0.5, True: None}  # attn_dim_head's default 64


@pytest.mark.parametrize("which", ["sinusoidal_pos_emb", "scaled_sinu_pos_emb"])
def test_tupe_with_sinusoidal_input_positions_adds_them_and_keeps_the_untied_term(which):
    """TUPE with a sinusoidal table asked for as well: the tokens enter the stack with the table's
    positions added (counting kept tokens: left padding moves nothing), and the first attention is
    still softmax(word term over sqrt(2d) + TUPE's position term), the word term read from that input."""
    torch.manual_seed(0)
    d = DIM // HEADS
    model = TransformerWrapper(num_tokens=20, max_seq_len=16, **{which: True}, attn_layers=Encoder(
        dim=DIM, depth=1, heads=HEADS, attn_dim_head=d, tupe=True, tupe_max_seq_len=16)).eval()
    assert isinstance(model.pos_emb, SinusoidalPositionalEmbedding) and model.attn_layers.tupe is not None
    seen = []
    model.attn_layers.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x = torch.randint(0, 20, (1, 5))
    _, (attn,) = model(x, return_attn=True)
    pos = torch.arange(5)[None]
    h0 = model.token_emb(x) + model.pos_emb(pos)
    torch.testing.assert_close(seen[0], h0)
    assert (model.pos_emb(pos) - model.pos_emb(pos + 1)).abs().max() > 1e-2  # the table does move the input
    layers, block = model.attn_layers, model.attn_layers.blocks[0]
    h = block.pre_norm(h0)
    q = block.fn.to_q(h).view(1, 5, HEADS, d).transpose(1, 2)
    k = block.fn.to_k(h).view(1, 5, HEADS, d).transpose(1, 2)
    pq = layers.tupe.to_q(layers.tupe.emb(pos)).view(1, 5, HEADS, d).transpose(1, 2)
    pk = layers.tupe.to_k(layers.tupe.emb(pos)).view(1, 5, HEADS, d).transpose(1, 2)
    want = ((q @ k.transpose(-1, -2) + pq @ pk.transpose(-1, -2)) / math.sqrt(2 * d)).softmax(dim=-1)
    torch.testing.assert_close(attn, want, atol=1e-5, rtol=1e-5)
    # left padding: the kept tokens get positions 0..4 again, so their outputs are unchanged
    xp, keep = torch.cat((torch.zeros(1, 2, dtype=torch.long), x), 1), torch.tensor([[False] * 2 + [True] * 5])
    out = model(xp, keep)
    torch.testing.assert_close(seen[-1][:, 2:], h0)
    torch.testing.assert_close(out[:, 2:], model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(tupe_untie_cls=True), dict(tupe_untie_cls=True, rel_pos_bias=True)],
                         ids=["tupe_cls", "tupe_r"])
def test_tupe_cache_matches_parallel(kw):
    model = lm(tupe=True, tupe_max_seq_len=16, **kw)
    x = torch.randint(0, 20, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :2] = False  # left padding: row 1's [CLS] is its first kept token
    full = model(x, mask)
    cache = KVCache()
    steps = [model(x[:, :3], mask[:, :3], cache=cache)]
    for t in range(3, 7):
        steps.append(model(x[:, t:t + 1], mask[:, t:t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc[1, 2:], full[1, 2:], atol=1e-5, rtol=1e-5)


def test_tupe_enforces_its_table_length():
    model = lm(tupe=True, tupe_max_seq_len=8)
    model(torch.randint(0, 20, (1, 8)))
    with pytest.raises(ValueError, match=r"tupe_max_seq_len \(8\)"):
        model(torch.randint(0, 20, (1, 9)))


@pytest.mark.parametrize("kw, a, b", [
    (dict(rotary_pos_emb=True), "tupe", "rotary_pos_emb"),
    (dict(alibi_pos_bias=True), "tupe", "alibi_pos_bias"),
])
def test_tupe_refuses_what_it_cannot_combine_with(kw, a, b):
    with pytest.raises(ConfigConflictError, match=f"{a} cannot be combined with {b}"):
        Decoder(dim=DIM, depth=1, heads=HEADS, tupe=True, tupe_max_seq_len=8, **kw)


def test_tupe_missing_sub_keywords():
    # (TUPE with a sinusoidal table composes: test_tupe_with_sinusoidal_input_positions_adds_them_...)
    # (tupe_untie_cls with memory tokens composes: they share the [CLS]'s position 0, test_wrappers.py)
    with pytest.raises(ValueError, match="needs tupe_max_seq_len"):
        Decoder(dim=DIM, depth=1, tupe=True)
    with pytest.raises(ValueError, match="set tupe=True"):
        Decoder(dim=DIM, depth=1, tupe_untie_cls=True)
    with pytest.raises(TypeError, match="'tupe_untie_cls'"):
        Decoder(dim=DIM, depth=1, tupe=True, tupe_max_seq_len=8, tupe_untie_clss=True)


def test_attn_scale_is_honoured():
    x = embeddings(n=4, b=1)
    a = Encoder(dim=DIM, depth=1, heads=HEADS, attn_scale=0.05).eval()
    _, (attn,) = a(x, return_attn=True)
    fn = a.blocks[0].fn
    h = a.blocks[0].pre_norm(x)
    q = fn.to_q(h).view(1, 4, HEADS, -1).transpose(1, 2)
    k = fn.to_k(h).view(1, 4, HEADS, -1).transpose(1, 2)
    torch.testing.assert_close(attn, (q @ k.transpose(-1, -2) * 0.05).softmax(-1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# every scheme composes with the attention features (the harness's properties on each pair)

load_features()
SCHEMES = [n for n, f in FEATURES.items() if f.group in ("relpos", "abspos")]
PARTNERS = ["mem_kv", "memory_tokens", "kv_heads", "talking_heads"]


# a sweep beyond the pairwise covering array, which has every such pair on every kind in CI (make fuzz runs it)
@pytest.mark.fuzz
@pytest.mark.parametrize("partner", PARTNERS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_composes_with_attention_features(scheme, partner):
    feats = (FEATURES[scheme], FEATURES[partner])
    run_properties(("finite", "causal", "padding", "backends"), ("decoder", feats))


def test_rotary_angles_stay_float32_after_casting_the_model():
    """model.to(bfloat16) must not round the rotary frequencies: angles at position 4000 would move."""
    from x_transformers import Decoder

    layers = Decoder(dim=32, depth=1, heads=4, rotary_pos_emb=True)
    pos = torch.tensor([[0, 1, 4000]])
    cos32, sin32 = layers.rotary(pos)
    cos16, sin16 = layers.to(torch.bfloat16).rotary(pos)
    assert cos16.dtype == torch.float32
    torch.testing.assert_close((cos16, sin16), (cos32, sin32), atol=0, rtol=0)


@pytest.mark.parametrize("cls, buckets", [(Decoder, 1), (Encoder, 1), (Encoder, 3)])
def test_t5_too_few_buckets_is_refused_naming_the_keyword(cls, buckets):
    # rel_pos_num_buckets=1 used to divide by zero in forward (NaN / garbage bucket indices)
    with pytest.raises(ValueError, match="rel_pos_num_buckets"):
        cls(dim=32, depth=1, heads=4, rel_pos_bias=True, rel_pos_num_buckets=buckets)


@pytest.mark.parametrize("cls, buckets", [(Decoder, 2), (Encoder, 4)])
def test_t5_fewest_buckets_run_finite(cls, buckets):
    model = cls(dim=32, depth=1, heads=4, rel_pos_bias=True, rel_pos_num_buckets=buckets, rel_pos_max_distance=8)
    out = model(torch.randn(1, 20, 32))
    assert torch.isfinite(out).all()
    rel = torch.arange(-20, 21)
    from x_transformers.positional import t5_bucket
    b = t5_bucket(rel[None], bidirectional=cls is Encoder, num_buckets=buckets, max_distance=8)
    assert int(b.min()) >= 0 and int(b.max()) < buckets
