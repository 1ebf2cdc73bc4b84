"""The defining property of each attention feature (issue 3), one test per row of its table,
(projections and heads).

Split by topic: projections and heads here (memory key/values and tokens, talking heads, free head
dimension, shared QK, grouped key/value heads, QK-norm); score normalisers, backend dispatch,
refusals and the positional combinations in test_attention_scores.py.

Most tests take the first attention block of a one-layer stack built through the public
keywords (so the keyword routing is exercised too) and compare it against a plain block that
holds the same weights. Legend: b batch, h heads, n queries, m keys, d head dim.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from x_transformers import (ConfigConflictError, CrossAttender, Decoder, Encoder, KVCache, TransformerWrapper,
                            XTransformer, attend_backend)
from x_transformers.attention import SELF_PENALTY

from attention_helpers import D, DIM, HEADS, attention, copy_weights, heads, inputs, key_mask, plain_logits, sharpen, weights


# ----------------------------------------------------------------------------------------------
# persistent memory key/values, 1907.01470


def test_mem_kv_learned_per_head_attended_by_every_query_and_causal():
    a = attention(causal=True, attn_num_mem_kv=3)
    assert a.mem_k.shape == a.mem_v.shape == (HEADS, 3, D)
    x = inputs().requires_grad_()
    w = weights(a, x)  # (b, h, n, 3 + n)
    assert w.shape == (2, HEADS, 8, 11)
    assert (w[..., :3] > 0).all(), "every query, the first included, attends to the memory"
    future = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert (w[..., 3:][..., future] == 0).all(), "no weight on later real tokens"
    torch.testing.assert_close(w.sum(-1), torch.ones(2, HEADS, 8))

    for backend in ("sdpa", "explicit"):
        with attend_backend(backend):
            out = a(x)[0]
        for t in range(7):
            (g,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
            assert g[:, t + 1:].abs().max() == 0, f"{backend}: output {t} depends on a later token"
        out.square().sum().backward()
        assert a.mem_k.grad.abs().sum() > 0 and a.mem_v.grad.abs().sum() > 0
        a.zero_grad()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_mem_kv_with_zero_values_and_minus_inf_logits_is_plain_attention(causal, backend):
    plain = attention(causal, attn_bias=True)
    mem = attention(causal, seed=5, attn_bias=True, attn_num_mem_kv=2)
    with torch.no_grad():
        # channel 0 of every query head is the constant 1, so a memory key -L * e_0 gets logit
        # -L / sqrt(d) from every query: weight exactly 0 once L is large
        rows = torch.arange(HEADS) * D
        plain.to_q.weight[rows] = 0.0
        plain.to_q.bias[rows] = 1.0
    assert copy_weights(mem, plain) == {"mem_k", "mem_v"}
    with torch.no_grad():
        mem.mem_v.zero_()
        mem.mem_k.zero_()
        mem.mem_k[..., 0] = -1e5
    x = inputs()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 5:] = False
    with attend_backend(backend):
        for mask in (None, key_mask(keep)):
            out, ref = mem(x, mask=mask)[0], plain(x, mask=mask)[0]
            torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------------------------
# memory tokens, 2006.11527


def memory_model(layers_cls=Decoder, M=2):
    torch.manual_seed(0)
    return TransformerWrapper(num_tokens=29, max_seq_len=16, num_memory_tokens=M,
                              attn_layers=layers_cls(dim=DIM, depth=2, heads=HEADS)).eval()


@pytest.mark.parametrize("layers_cls", [Encoder, Decoder])
def test_memory_tokens_prepended_read_by_every_layer_and_stripped(layers_cls):
    model = memory_model(layers_cls)
    x = torch.randint(0, 29, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (2, 8, 29)
    # by hand: embeddings, the memory prepended, the stack over all n + M, the memory cut off
    h = model.token_emb(x) + model.pos_emb(torch.arange(8)[None])
    h = torch.cat((model.memory_tokens.expand(2, -1, -1), h), dim=1)
    torch.testing.assert_close(out, model.to_logits(model.attn_layers(h)[:, 2:]), atol=0, rtol=0)
    # every real token, the first of a decoder included, reads the memory
    (g,) = torch.autograd.grad(out[:, 0].sum(), model.memory_tokens)
    assert g.abs().sum(-1).min() > 0


def test_memory_tokens_keep_real_tokens_causal():
    model = memory_model(Decoder)
    captured = {}
    handle = model.token_emb.register_forward_hook(lambda m, a, o: captured.setdefault("emb", o))
    x = torch.randint(0, 29, (1, 8), generator=torch.Generator().manual_seed(0))
    out = model(x)
    handle.remove()
    emb = captured["emb"]
    for t in range(8):
        g_emb, g_mem = torch.autograd.grad(out[:, t].sum(), (emb, model.memory_tokens), retain_graph=True)
        assert (g_emb[:, t + 1:] == 0).all(), f"output {t} depends on a later token"
        assert g_emb[:, t].abs().sum() > 0 and g_mem.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# talking heads, 2003.02436


@pytest.mark.parametrize("kw, params", [("attn_talking_heads", {"pre_mix", "post_mix"}),
                                        ("attn_pre_talking_heads", {"pre_mix"}),
                                        ("attn_post_talking_heads", {"post_mix"})])
def test_talking_heads_identity_mixing_is_plain_attention(kw, params):
    plain, th = attention(), attention(seed=3, **{kw: True})
    assert copy_weights(th, plain) == params
    for name in params:
        torch.testing.assert_close(getattr(th, name).detach(), torch.eye(HEADS), atol=0, rtol=0)
    x = inputs()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :3] = False
    with attend_backend("explicit"):  # both on one kernel: the identity mixing is exact
        for mask in (None, key_mask(keep)):
            assert torch.equal(th(x, mask=mask)[0], plain(x, mask=mask)[0])
    # non-identity mixing changes the output, and the mixing weights learn
    with torch.no_grad():
        for name in params:
            getattr(th, name).copy_(torch.randn(HEADS, HEADS, generator=torch.Generator().manual_seed(2)))
    sharpen(th, plain)
    out = th(x)[0]
    assert not torch.allclose(out, plain(x)[0], atol=1e-3)
    out.square().sum().backward()
    for name in params:
        assert getattr(th, name).grad.abs().sum() > 0


def test_talking_heads_mix_logits_before_and_weights_after_the_softmax():
    plain, pre, post = attention(), attention(attn_pre_talking_heads=True), attention(attn_post_talking_heads=True)
    copy_weights(pre, plain), copy_weights(post, plain)
    sharpen(plain, pre, post)
    avg = torch.full((HEADS, HEADS), 1.0 / HEADS)
    with torch.no_grad():
        pre.pre_mix.copy_(avg), post.post_mix.copy_(avg)
    x = inputs()
    logits = plain_logits(plain, x)
    # pre-softmax: every head normalises the average logits
    expected = logits.mean(1, keepdim=True).softmax(-1).expand(-1, HEADS, -1, -1)
    torch.testing.assert_close(weights(pre, x), expected)
    # post-softmax: every head uses the average of the heads' normalised weights
    expected = logits.softmax(-1).mean(1, keepdim=True).expand(-1, HEADS, -1, -1)
    torch.testing.assert_close(weights(post, x), expected)
    assert not torch.allclose(weights(pre, x), weights(post, x), atol=1e-3)


# ----------------------------------------------------------------------------------------------
# free head dimension, 2002.07028


@pytest.mark.parametrize("d", [1, 5, 12, 40])
def test_dim_head_is_free_of_dim_over_heads(d):
    a = attention(attn_dim_head=d)
    assert a.to_q.weight.shape == a.to_k.weight.shape == a.to_v.weight.shape == (HEADS * d, DIM)
    assert a.to_out.weight.shape == (DIM, HEADS * d)
    sharpen(a)
    x = inputs()
    torch.testing.assert_close(weights(a, x), plain_logits(a, x).softmax(-1))  # scaled by d ** -0.5
    out = a(x)[0]
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in a.parameters())


# ----------------------------------------------------------------------------------------------
# shared query-key attention, 2001.04451


def test_shared_qk_keys_are_normalised_queries_one_projection_fewer():
    plain, shared = attention(), attention(attn_shared_qk=True)
    assert shared.to_k is None
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(plain) - count(shared) == DIM * HEADS * D
    sharpen(shared)
    x = inputs()
    q = heads(shared.to_q(x), HEADS)
    logits = q @ F.normalize(q, dim=-1).transpose(-1, -2) * D ** -0.5
    own = torch.eye(8, dtype=torch.bool)
    # without the penalty a token's own key would be its best match: q . q/|q| = |q|
    assert torch.equal(logits.argmax(-1), torch.arange(8).expand(2, HEADS, 8))
    w = weights(shared, x)
    torch.testing.assert_close(w, logits.masked_fill(own, -SELF_PENALTY).softmax(-1))
    assert w[..., own].max() < 1e-6, "a token does not attend to itself"


def test_shared_qk_over_another_sequence_keys_are_its_normalised_queries():
    """A funnel's pooled queries (kv=): the keys are the unit-normalised query projections of the
    unpooled sequence, and no key is a pooled query's own, so none is penalised."""
    a = attention(attn_shared_qk=True)
    sharpen(a)
    x, src = inputs(n=4), inputs(n=8, seed=2)
    q, ks = heads(a.to_q(x), HEADS), F.normalize(heads(a.to_q(src), HEADS), dim=-1)
    out, w = a(x, kv=src, need_weights=True)
    torch.testing.assert_close(w, (q @ ks.transpose(-1, -2) * D ** -0.5).softmax(-1))
    v = heads(a.to_v(src), HEADS)
    torch.testing.assert_close(out, a.to_out((w @ v).transpose(1, 2).reshape(2, 4, -1)))


def test_shared_qk_with_kv_heads_equal_to_heads_is_plain_shared_qk():
    with pytest.raises(ConfigConflictError, match="attn_shared_qk.*attn_kv_heads"):
        attention(attn_shared_qk=True, attn_kv_heads=2)
    same, ref = attention(attn_shared_qk=True, attn_kv_heads=HEADS), attention(attn_shared_qk=True)
    x = inputs()
    torch.testing.assert_close(same(x)[0], ref(x)[0])


def test_shared_qk_attends_to_itself_only_when_nothing_else_is_visible():
    dec = attention(causal=True, attn_shared_qk=True)
    w = weights(dec, inputs())
    torch.testing.assert_close(w[..., 0, 0], torch.ones(2, HEADS))  # the first token sees only itself
    assert w[..., 1:, :].diagonal(offset=1, dim1=-2, dim2=-1).max() < 1e-6
    enc = attention(attn_shared_qk=True)
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[:, 3] = True  # only key 3 is visible: query 3 has nothing else
    w = weights(enc, inputs(), mask=key_mask(keep))
    torch.testing.assert_close(w[..., 3], torch.ones(2, HEADS, 8))


def test_shared_qk_applies_to_self_attention_only():
    torch.manual_seed(0)
    model = XTransformer(dim=DIM, depth=1, heads=HEADS, num_tokens=29, max_seq_len=16, attn_shared_qk=True)
    self_attn, cross_attn = (b.fn for b in model.decoder.attn_layers.blocks[:2])
    assert self_attn.shared_qk and self_attn.to_k is None
    assert not cross_attn.shared_qk and cross_attn.to_k is not None  # keys come from the context
    src, tgt = torch.randint(0, 29, (2, 7)), torch.randint(0, 29, (2, 5))
    assert torch.isfinite(model(src, tgt)).all()
    with pytest.raises(ConfigConflictError, match="attn_shared_qk.*only_cross"):
        CrossAttender(dim=DIM, depth=1, heads=HEADS, attn_shared_qk=True)


# ----------------------------------------------------------------------------------------------
# grouped / multi-query key-value heads, 2305.13245, 1911.02150


def test_kv_heads_equal_to_heads_is_multi_head_attention():
    plain, grouped = attention(), attention(attn_kv_heads=HEADS)
    grouped.load_state_dict(plain.state_dict(), strict=True)
    x = inputs()
    assert torch.equal(grouped(x)[0], plain(x)[0])


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_grouped_kv_heads_equal_mha_with_shared_kv_weights(g, backend):
    gqa, mha = attention(causal=True, attn_kv_heads=g), attention(causal=True)
    kv_params = lambda a: a.to_k.weight.numel() + a.to_v.weight.numel()  # noqa: E731
    assert kv_params(gqa) * HEADS == kv_params(mha) * g
    with torch.no_grad():  # each group's key/value head repeated for its HEADS // g query heads
        mha.to_q.weight.copy_(gqa.to_q.weight)
        mha.to_out.weight.copy_(gqa.to_out.weight)
        for name in ("to_k", "to_v"):
            w = getattr(gqa, name).weight.view(g, D, DIM).repeat_interleave(HEADS // g, dim=0)
            getattr(mha, name).weight.copy_(w.reshape(HEADS * D, DIM))
    x = inputs()
    with attend_backend(backend):
        torch.testing.assert_close(gqa(x)[0], mha(x)[0])


@pytest.mark.parametrize("g", [1, 2, HEADS])
def test_kv_heads_shrink_the_cache(g):
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=29, max_seq_len=16,
                               attn_layers=Decoder(dim=DIM, depth=2, heads=HEADS, attn_kv_heads=g,
                                                                   attn_dim_head=D)).eval()
    x = torch.randint(0, 29, (2, 6))
    cache = KVCache()
    logits = model(x, cache=cache)
    filled = [layer for layer in cache.layers.values() if layer.k is not None]
    assert len(filled) == 2
    for layer in filled:
        assert layer.k.shape == layer.v.shape == (2, g, 6, D)
    step = torch.randint(0, 29, (2, 1))
    torch.testing.assert_close(model(step, cache=cache)[:, -1], model(torch.cat((x, step), 1))[:, -1])
    torch.testing.assert_close(logits, model(x))


# ----------------------------------------------------------------------------------------------
# query-key normalisation, 2010.04245


def test_qk_norm_normalises_q_and_k_with_a_learned_scale():
    a = attention(attn_qk_norm=True)
    torch.testing.assert_close(a.qk_scale.detach().flatten(), torch.full((HEADS,), 10.0))
    x = inputs()
    q, k = heads(a.to_q(x), HEADS), heads(a.to_k(x), HEADS)
    cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    w = weights(a, x)
    torch.testing.assert_close(w, (cos * a.qk_scale).softmax(-1))
    ref = a(x)[0]
    sharpen(a, factor=100.0)  # the logits do not depend on the norms of q and k
    torch.testing.assert_close(a(x)[0], ref)
    a(x)[0].square().sum().backward()
    assert (a.qk_scale.grad != 0).all()


@pytest.mark.parametrize("extra", [{}, dict(attn_num_mem_kv=2), dict(attn_l2_distance=True)])
def test_qk_norm_with_attn_scale_is_a_fixed_scale_on_the_unit_logits(extra):
    """attn_scale under QK-norm: the cosine logits times that constant (upstream's fixed QK-norm
    scale), no learned scale; the logits still ignore the norms of q and k. With
    attn_qk_norm_scale as well it is refused: one would start a learned scale, the other fix it."""
    a = attention(attn_qk_norm=True, attn_scale=4.0, **extra)
    assert a.qk_scale is None and not any("qk_scale" in n for n, _ in a.named_parameters())
    x = inputs()
    q, k = F.normalize(heads(a.to_q(x), HEADS), dim=-1), F.normalize(heads(a.to_k(x), HEADS), dim=-1)
    if a.mem_k is not None:
        k = torch.cat((F.normalize(a.mem_k, dim=-1).expand(x.shape[0], -1, -1, -1), k), dim=-2)
    logits = 4.0 * (-(q[..., :, None, :] - k[..., None, :, :]).square().sum(-1) if extra.get("attn_l2_distance")
                    else q @ k.transpose(-1, -2))
    torch.testing.assert_close(weights(a, x), logits.softmax(-1))
    ref = a(x)[0]
    sharpen(a, factor=100.0)
    torch.testing.assert_close(a(x)[0], ref)
    with pytest.raises(ConfigConflictError, match="attn_qk_norm_scale.*attn_scale"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_qk_norm=True, attn_qk_norm_scale=10.0, attn_scale=4.0)


def test_qk_norm_is_stable_in_bf16_under_huge_logits():
    x = inputs(n=16)

    def worst_row_error(a):
        ref = copy.deepcopy(a).double()(x.double())[0]
        out = copy.deepcopy(a).bfloat16()(x.bfloat16())[0].double()
        assert torch.isfinite(out).all()
        return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()

    plain, normed = attention(), attention(attn_qk_norm=True)
    copy_weights(normed, plain)
    sharpen(plain, normed, factor=1000.0)  # plain logits in the thousands
    assert worst_row_error(normed) < 0.05
    assert worst_row_error(plain) > 0.2  # bf16 rounding of huge logits moves the softmax
