"""Layer layouts: macaron, sandwich_coef, custom_layers, top_attn_to_ff; attention dropout."""

import pytest
import torch

from x_transformers import Decoder, Encoder
from x_transformers.attention import Attention
from x_transformers.config import ConfigConflictError
from x_transformers.feedforward import FeedForward


def count(module):
    return sum(p.numel() for p in module.parameters())


def kinds(model):
    return [s.kind for s in model.layout]


def compose(model, x):
    """The stack as the plain sequential composition of its blocks, in layout order."""
    for spec, block in zip(model.layout, model.blocks):
        x, _ = block(x)
    return model.final_norm(x)


def test_layout_is_printed_in_repr():
    model = Encoder(dim=32, depth=2, heads=4)
    assert model.layout_string == "a f a f"
    assert "layout=a f a f" in repr(model)


def test_macaron_is_half_ff_attention_half_ff():
    # 1906.02762: x + 1/2 FF(x), then attention, then x + 1/2 FF(x)
    model = Encoder(dim=32, depth=2, heads=4, macaron=True)
    assert model.layout_string == "f*0.5 a f*0.5 f*0.5 a f*0.5"
    assert "layout=f*0.5 a f*0.5" in repr(model)
    x = torch.randn(2, 5, 32)
    for spec, block in zip(model.layout, model.blocks):
        if spec.kind == "f":
            assert isinstance(block.fn, FeedForward)
            torch.testing.assert_close(block(x)[0], x + 0.5 * block.fn(block.pre_norm(x)))
    torch.testing.assert_close(model(x), compose(model, x))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_sandwich_coef_puts_k_attentions_first_and_k_ffs_last(k):
    # 1911.03864: a^k (af)^(depth-k) f^k
    depth = 4
    model = Encoder(dim=32, depth=depth, heads=4, sandwich_coef=k)
    layout = "".join(kinds(model))
    assert layout == "a" * k + "af" * (depth - k) + "f" * k
    plain = Encoder(dim=32, depth=depth, heads=4)
    assert sorted(kinds(model)) == sorted(kinds(plain))  # same count of each sublayer
    assert count(model) == count(plain)


def test_custom_layers_any_order():
    order = ("f", "a", "a", "f", "f", "c", "a")
    model = Decoder(dim=32, depth=2, heads=4, custom_layers=order)
    assert tuple(kinds(model)) == order
    for spec, block in zip(model.layout, model.blocks):
        expected = FeedForward if spec.kind == "f" else Attention
        assert isinstance(block.fn, expected)
        if spec.kind != "f":
            assert block.fn.cross == (spec.kind == "c")
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    out = model(x, context=ctx)
    # the blocks run in exactly the given order
    h = x
    for spec, block in zip(model.layout, model.blocks):
        h, _ = block(h, ctx) if spec.kind == "c" else block(h)
    torch.testing.assert_close(out, model.final_norm(h))


def test_top_attn_to_ff_removes_attention_from_top_layers():
    # 2005.13895: the top n layers' self-attention becomes a feed-forward sublayer
    depth, n, dim = 4, 2, 32
    sizes = dict(attn_dim_head=dim // 4, norm_bias=True)  # the counts below are for these
    model = Encoder(dim=dim, depth=depth, heads=4, top_attn_to_ff=n, **sizes)
    assert model.layout_string == "a f a f f f f f"
    top = model.blocks[2 * (depth - n):]
    assert not [m for m in top.modules() if isinstance(m, Attention)]
    # parameter count: each replaced layer trades one attention block for one feed-forward block
    plain = Encoder(dim=dim, depth=depth, heads=4, **sizes)
    attn = count(plain.blocks[0])  # LayerNorm + q, k, v, out (4 dim^2)
    ff = count(plain.blocks[1])  # LayerNorm + 2 * 4 dim^2 + biases
    assert attn == 4 * dim * dim + 2 * dim
    assert ff == 8 * dim * dim + 4 * dim + dim + 2 * dim
    assert count(model) == count(plain) + n * (ff - attn)
    # the top layers are position-wise: changing another token leaves a token's top-layer update alone
    x = torch.randn(1, 6, dim)
    h = x
    for block in model.blocks[: 2 * (depth - n)]:
        h, _ = block(h)
    h2 = h.clone()
    h2[:, 0] += 1.0
    for block in top:
        h, _ = block(h)
        h2, _ = block(h2)
    torch.testing.assert_close(h[:, 1:], h2[:, 1:])


def test_top_attn_to_ff_keeps_cross_attention_and_macaron():
    dec = Decoder(dim=32, depth=2, heads=4, cross_attend=True, top_attn_to_ff=1)
    assert dec.layout_string == "a c f f c f"
    mac = Encoder(dim=32, depth=2, heads=4, macaron=True, top_attn_to_ff=1)
    assert mac.layout_string == "f*0.5 a f*0.5 f*0.5 f f*0.5"


@pytest.mark.parametrize("kw, before, after", [
    (dict(depth=3, sandwich_coef=1, top_attn_to_ff=1), "a a f a f f", "a a f f f f"),
    (dict(depth=3, sandwich_coef=2, top_attn_to_ff=2), "a a a f f f", "a f f f f f"),
    (dict(depth=2, custom_layers=("a", "f", "f", "a", "f"), top_attn_to_ff=1), "a f f a f", "a f f f f"),
    (dict(depth=2, custom_layers=("a", "c", "f", "a"), top_attn_to_ff=2), "a c f a", "f c f f"),
    # only_attn's attention-only layout: its top n self-attentions become the stack's only feed-forwards
    (dict(depth=3, only_attn=True, top_attn_to_ff=1), "a a a", "a a f"),
    (dict(depth=2, only_attn=True, cross_attend=True, top_attn_to_ff=2), "a c a c", "f c f c"),
])
def test_top_attn_to_ff_replaces_the_last_self_attentions_of_any_layout(kw, before, after):
    """2005.13895 on a sandwich or custom layout: its top (last) n self-attention blocks become
    feed-forwards, cross-attention stays; the model is the layout's with those blocks swapped."""
    n = kw.pop("top_attn_to_ff")
    base = Decoder(dim=32, heads=4, **kw) if "c" in before else Encoder(dim=32, heads=4, **kw)
    model = type(base)(dim=32, heads=4, top_attn_to_ff=n, **kw)
    assert base.layout_string == before and model.layout_string == after
    attn = lambda m: sum(isinstance(b.fn, Attention) and not b.fn.cross for b in m.blocks)  # noqa: E731
    assert attn(model) == attn(base) - n
    # everything above the last remaining self-attention is position-wise (or cross-attention)
    last = max((i for i, s in enumerate(model.layout) if s.kind == "a"), default=-1)
    x, ctx = torch.randn(1, 6, 32), torch.randn(1, 3, 32)
    h = x
    for spec, block in list(zip(model.layout, model.blocks))[: last + 1]:
        h, _ = block(h, ctx) if spec.kind == "c" else block(h)
    h2 = h.clone()
    h2[:, 0] += 1.0
    for spec, block in list(zip(model.layout, model.blocks))[last + 1:]:
        h, _ = block(h, ctx) if spec.kind == "c" else block(h)
        h2, _ = block(h2, ctx) if spec.kind == "c" else block(h2)
    torch.testing.assert_close(h[:, 1:], h2[:, 1:])


def test_top_attn_to_ff_is_at_most_the_self_attentions_there_are():
    with pytest.raises(ValueError, match="top_attn_to_ff.*self-attention blocks"):
        Encoder(dim=32, depth=3, heads=4, custom_layers=("a", "f", "a", "f"), top_attn_to_ff=3)
    with pytest.raises(ValueError, match="top_attn_to_ff"):
        Encoder(dim=32, depth=2, heads=4, top_attn_to_ff=3)
    with pytest.raises(TypeError, match="top_attn_to_ff"):
        Encoder(dim=32, depth=2, heads=4, top_attn_to_f=1)


def test_attn_dropout_drops_attention_weights_in_training_only():
    torch.manual_seed(0)
    model = Encoder(dim=32, depth=2, heads=4, attn_dropout=0.5)
    plain = Encoder(dim=32, depth=2, heads=4)
    plain.load_state_dict(model.state_dict())
    assert all(b.fn.cfg.dropout == 0.5 for b in model.blocks if isinstance(b.fn, Attention))
    x = torch.randn(2, 6, 32)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------
# dim_context: only cross-attention reads the context's width


def test_dim_context_is_read_by_cross_attention_only():
    torch.manual_seed(0)
    dec = Decoder(dim=64, depth=1, heads=4, cross_attend=True, dim_context=96).eval()
    out = dec(torch.randn(1, 8, 64), context=torch.randn(1, 12, 96))
    assert out.shape == (1, 8, 64)
    self_attn, cross_attn = dec.blocks[0].fn, dec.blocks[1].fn
    assert self_attn.to_k.in_features == 64 and cross_attn.to_k.in_features == 96


def test_dim_context_cache_decoding_matches_full_forward():
    from x_transformers import KVCache, StaticKVCache

    torch.manual_seed(0)
    dec = Decoder(dim=32, depth=2, heads=4, cross_attend=True, dim_context=48).eval()
    x, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 48)
    full = dec(x, context=ctx)
    for cache in (KVCache(), StaticKVCache.for_model(dec, 2, 7)):
        steps = [dec(x[:, :3], context=ctx, cache=cache)]
        steps += [dec(x[:, t:t + 1], context=ctx, cache=cache) for t in range(3, 7)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_causal_of_the_wrong_type_is_refused_naming_it():
    for cls in (Encoder, Decoder):
        with pytest.raises(ValueError, match="causal must be True or False, got 'no'"):
            cls(dim=16, depth=1, heads=2, causal="no")


def test_sandwich_coef_with_macaron_sandwiches_the_macaron_unit_with_half_step_ffs():
    """As upstream: a^k (f a f)^(depth-k) f^k, every feed-forward a half step (its branch x 0.5);
    logits against the real package are in tests/test_upstream_checkpoint.py."""
    model = Encoder(dim=32, depth=3, heads=4, sandwich_coef=1, macaron=True)
    assert model.layout_string == "a f*0.5 a f*0.5 f*0.5 a f*0.5 f*0.5"
