"""Value residual learning (ResFormer, 2410.17897; value_residual.py): the formula against a hand
computation, the wiring of the stack (a mix of 1 is the plain model), cache agreement, and the
keywords' spellings."""

import pytest
import torch

from attention_helpers import DIM, HEADS, assert_cache_decoding_equals_full_forward, heads, inputs
from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.value_residual import ValueResidual


def by_hand(a, x, v):
    """causal softmax(q k^T / sqrt(d)) v, then the output projection, for block a over x with values v."""
    q, k = heads(a.to_q(x), a.heads), heads(a.to_k(x), a.kv_heads)
    n = x.shape[1]
    logits = (q @ k.transpose(-1, -2)) * a.dim_head ** -0.5
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = logits.softmax(-1) @ v  # (b, h, n, e)
    return a.to_out(out.transpose(1, 2).reshape(x.shape[0], n, -1))


@pytest.mark.parametrize("learned", [True, False])
def test_later_values_are_the_papers_mix_with_the_first_ones(learned):
    torch.manual_seed(0)
    stack = Decoder(dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, add_value_residual=True,
                    learned_value_residual_mix=learned).eval()
    a1, a2 = stack.blocks[0].fn, stack.blocks[2].fn
    assert (a1.value_mix is None) and ((a2.value_mix is not None) == learned)
    if learned:  # away from the 1/2 the zero-initialised bias gives
        torch.nn.init.normal_(a2.value_mix.proj.weight, std=0.5)
    x1, x2 = inputs(seed=1), inputs(seed=2)
    store = ValueResidual()
    out1, _ = a1(x1, value_residual=store)
    out2, _ = a2(x2, value_residual=store)
    v1, v2 = heads(a1.to_v(x1), a1.kv_heads), heads(a2.to_v(x2), a2.kv_heads)
    lam = torch.sigmoid(x2 @ a2.value_mix.proj.weight.T + a2.value_mix.proj.bias).transpose(1, 2)[..., None] \
        if learned else 0.5
    torch.testing.assert_close(out1, by_hand(a1, x1, v1))  # the first block keeps its own values
    torch.testing.assert_close(out2, by_hand(a2, x2, (1 - lam) * v1 + lam * v2))
    if learned:
        assert lam.shape == (2, HEADS, 8, 1) and lam.std() > 0.05  # per token and head


def test_a_mix_of_one_is_the_plain_stack_and_the_first_values_get_gradient_from_later_layers():
    torch.manual_seed(0)
    plain = Decoder(dim=DIM, depth=3, heads=HEADS, attn_dim_head=8)
    mixed = Decoder(dim=DIM, depth=3, heads=HEADS, attn_dim_head=8, add_value_residual=True)
    missing, _ = mixed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"blocks.{i}.fn.value_mix.proj.{p}" for i in (2, 4) for p in ("bias", "weight")]
    x = inputs()
    with torch.no_grad():
        for i in (2, 4):
            mixed.blocks[i].fn.value_mix.proj.weight.zero_()
            mixed.blocks[i].fn.value_mix.proj.bias.fill_(40.0)  # lam = 1: every layer keeps its own values
    torch.testing.assert_close(mixed(x), plain(x))
    with torch.no_grad():
        for i in (2, 4):
            mixed.blocks[i].fn.value_mix.proj.bias.fill_(-40.0)  # lam = 0: every layer reads the first's values
    before = mixed(x)
    with torch.no_grad():
        for i in (2, 4):
            mixed.blocks[i].fn.to_v.weight.normal_()
    after = mixed(x)
    torch.testing.assert_close(after, before)  # the later layers' own values no longer matter
    assert not torch.allclose(after, plain(x), atol=1e-4)
    probe = torch.randn(after.shape, generator=torch.Generator().manual_seed(0))  # (a sum is flat through the final norm)
    (g_late, g_first) = torch.autograd.grad((after * probe).sum(), [mixed.blocks[2].fn.to_v.weight,
                                                          mixed.blocks[0].fn.to_v.weight])
    assert g_late.abs().max() < 1e-6 and g_first.abs().max() > 1e-4


@pytest.mark.parametrize("kw", [dict(), dict(learned_value_residual_mix=False),
                                dict(cross_attend=True, attn_value_rmsnorm=True)])
def test_cache_decoding_equals_the_full_forward(kw):
    torch.manual_seed(0)
    context = torch.randn(2, 5, DIM) if kw.get("cross_attend") else None
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, add_value_residual=True, rotary_pos_emb=True, **kw))
    if context is None:
        assert_cache_decoding_equals_full_forward(net)
        return
    from x_transformers.cache import KVCache

    net.eval()
    x = torch.randint(0, 20, (2, 7))
    full = net(x, context=context)
    cache = KVCache()
    steps = [net(x[:, :3], context=context, cache=cache)]
    steps += [net(x[:, t:t + 1], context=context, cache=cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_cross_attention_values_mix_at_one_half_with_the_first_cross_attention():
    torch.manual_seed(0)
    stack = Encoder(dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, cross_attend=True, add_value_residual=True).eval()
    c1, c2 = stack.blocks[1].fn, stack.blocks[4].fn
    assert c1.value_mix is None and c2.value_mix is None  # a context token has no query to read a mix from
    x, ctx = inputs(n=3), inputs(n=5, seed=3)
    store = ValueResidual()
    c1(x, ctx, value_residual=store)
    out, w = c2(x, ctx, value_residual=store, need_weights=True)
    v = 0.5 * (heads(c1.to_v(ctx), HEADS) + heads(c2.to_v(ctx), HEADS))
    expect = c2.to_out((w @ v).transpose(1, 2).reshape(2, 3, -1))
    torch.testing.assert_close(out, expect)


def test_keywords_and_their_upstream_spellings():
    stack = Decoder(dim=DIM, depth=2, heads=HEADS, add_value_residual=True, attn_learned_value_residual_mix=False)
    assert all(b.fn.value_mix is None for b in stack.blocks[::2])
    with pytest.raises(ValueError, match="learned_value_residual_mix=False configures add_value_residual"):
        Decoder(dim=DIM, depth=2, heads=HEADS, learned_value_residual_mix=False)
    # upstream's default spelled out changes nothing
    a = Decoder(dim=DIM, depth=2, heads=HEADS, learned_value_residual_mix=True)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in Decoder(dim=DIM, depth=2,
                                                                                      heads=HEADS).parameters())
