"""Upstream's per-call stack inputs (stack_calls.py): custom positions ``pos`` / ``context_pos`` and
``return_hiddens`` with its Intermediates as a cache."""

import pytest
import torch

from x_transformers import Decoder, Encoder
from x_transformers.cache import Intermediates

torch.manual_seed(0)

POSITIONAL = dict(rotary=dict(rotary_pos_emb=True), alibi=dict(alibi_pos_bias=True),
                  t5=dict(rel_pos_bias=True), dynamic=dict(dynamic_pos_bias=True), polar=dict(polar_pos_emb=True))


def _stack(cls=Decoder, **kw):
    """A small stack whose attention is sharp (GPT-2's init leaves it near uniform at this size, where
    positions barely move the output)."""
    torch.manual_seed(0)
    net = cls(dim=32, depth=2, heads=4, attn_dim_head=8, **kw).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "to_q" in name or "to_k" in name or name.startswith("rel_pos"):
                p.mul_(8.0)
    return net


@pytest.mark.parametrize("scheme", list(POSITIONAL) + ["none"])
@pytest.mark.parametrize("shape", ["n", "1n", "bn"])
def test_explicit_arange_is_the_default(scheme, shape):
    net = _stack(**POSITIONAL.get(scheme, {}))
    x = torch.randn(2, 7, 32)
    pos = {"n": torch.arange(7), "1n": torch.arange(7)[None], "bn": torch.arange(7).expand(2, 7)}[shape]
    assert torch.equal(net(x, pos=pos), net(x))


@pytest.mark.parametrize("scheme", ["rotary", "alibi", "t5", "dynamic"])
def test_shifted_positions_change_nothing_under_relative_schemes(scheme):
    net = _stack(**POSITIONAL[scheme])
    x = torch.randn(2, 9, 32)
    base = torch.arange(9)
    plain = net(x)
    shift_err = (net(x, pos=base + 37) - plain).abs().max()
    assert shift_err < 1e-5
    # and the positions are read: gaps between tokens change the output, by far more than the shift's error
    assert (net(x, pos=base * 3) - plain).abs().max() > 1e-4 > 10 * shift_err


def test_positions_per_row_match_separate_calls():
    net = _stack(rotary_pos_emb=True, alibi_pos_bias=True)
    x = torch.randn(2, 6, 32)
    pos = torch.tensor([[0, 1, 2, 4, 7, 8], [3, 5, 6, 9, 10, 14]])
    both = net(x, pos=pos)
    for r in range(2):
        assert torch.allclose(both[r:r + 1], net(x[r:r + 1], pos=pos[r]), atol=1e-6)


@pytest.mark.parametrize("scheme", ["rotary", "alibi", "polar"])
def test_cached_decoding_with_custom_positions_is_exact(scheme):
    net = _stack(**POSITIONAL[scheme])
    x = torch.randn(2, 12, 32)
    pos = torch.tensor([0, 2, 3, 5, 8, 9, 11, 12, 15, 16, 20, 21]) + 4
    full = net(x, pos=pos)
    out, inter = net(x[:, :8], pos=pos[:8], return_hiddens=True)
    steps = [out]
    for t in range(8, 12):
        # upstream's convention: pos may cover the cached tokens too (its last n columns are taken)
        step, inter = net(x[:, t:t + 1], pos=pos[:t + 1], cache=inter, return_hiddens=True)
        steps.append(step)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_alibi_positions_per_head():
    net = _stack(alibi_pos_bias=True, alibi_num_heads=2, rel_pos_kwargs=dict(slopes=[1.0, 0.5]))
    x = torch.randn(2, 5, 32)
    pos = torch.tensor([0, 1, 3, 4, 9])
    # the same positions for every ALiBi head: as one shared sequence
    same = pos.expand(2, 2, 5)
    assert torch.allclose(net(x, pos=same), net(x, pos=pos), atol=1e-6)
    # each head's bias is -slope_h * |p_i - p_j| over its own positions; heads without ALiBi get none
    per_head = torch.stack((pos, pos * 2))[None].expand(2, 2, 5)
    bias = net.rel_pos.score_mod(per_head, per_head).dense()  # (b, heads, n, n)
    slopes = net.rel_pos.slopes.view(-1)
    for h, p in enumerate((pos, pos * 2)):
        want = -slopes[h] * (p[:, None] - p[None, :]).abs().float()
        assert torch.allclose(bias[0, h], want)
    assert torch.equal(bias[:, 2:], torch.zeros_like(bias[:, 2:]))
    assert not torch.allclose(net(x, pos=per_head), net(x, pos=pos), atol=1e-4)


def test_context_positions_rotate_cross_attention_relatively():
    net = _stack(Encoder, rotary_pos_emb=True, cross_attend=True, cross_attn_dim_context=16)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 10, 16)
    pos, cpos = torch.arange(6), torch.arange(10) * 2
    out = net(x, context=ctx, pos=pos, context_pos=cpos)
    # queries and keys rotated: only position differences count
    assert torch.allclose(net(x, context=ctx, pos=pos + 11, context_pos=cpos + 11), out, atol=1e-5)
    assert not torch.allclose(net(x, context=ctx, pos=pos), out, atol=1e-4)


def test_cross_attention_cache_with_context_positions():
    net = _stack(rotary_pos_emb=True, cross_attend=True)
    x, ctx, cpos = torch.randn(1, 7, 32), torch.randn(1, 5, 32), torch.arange(5) + 3
    full = net(x, context=ctx, context_pos=cpos)
    out, inter = net(x[:, :4], context=ctx, context_pos=cpos, return_hiddens=True)
    steps = [out]
    for t in range(4, 7):
        step, inter = net(x[:, :t + 1], context=ctx, context_pos=cpos, cache=inter, return_hiddens=True)
        steps.append(step)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (dict(pos=torch.arange(5.0)), "integer tensor"),
    (dict(pos=torch.arange(6)), r"shape \(5,\)"),
    (dict(pos=torch.arange(5), positions=torch.arange(5)[None]), "pos and positions"),
])
def test_pos_refusals(call, match):
    net = _stack(rotary_pos_emb=True)
    with pytest.raises((ValueError, TypeError), match=match):
        net(torch.randn(1, 5, 32), **call)


def test_per_head_positions_refused_without_alibi_alone():
    with pytest.raises(ValueError, match="only ALiBi"):
        _stack(rotary_pos_emb=True, alibi_pos_bias=True)(torch.randn(1, 5, 32), pos=torch.zeros(1, 4, 5).long())
    with pytest.raises(ValueError, match="only ALiBi"):
        _stack(rotary_pos_emb=True)(torch.randn(1, 5, 32), pos=torch.zeros(1, 4, 5).long())


def test_context_pos_refusals():
    with pytest.raises(ValueError, match="needs rotary_pos_emb"):
        _stack(cross_attend=True)(torch.randn(1, 5, 32), context=torch.randn(1, 3, 32), context_pos=torch.arange(3))
    with pytest.raises(ValueError, match="no cross-attention"):
        _stack(rotary_pos_emb=True)(torch.randn(1, 5, 32), context_pos=torch.arange(3))


def test_return_hiddens_records_every_block_input():
    net = _stack()
    x = torch.randn(2, 5, 32)
    out, inter = net(x, return_hiddens=True)
    assert isinstance(inter, Intermediates) and torch.equal(out, net(x)) and torch.equal(inter.last_hidden, out)
    assert len(inter.layer_hiddens) == len(net.layout) + 1 and torch.equal(inter.layer_hiddens[0], x)
    # block i's input is block i - 1's output: rerun block 0 by hand
    h1, _ = net.blocks[0](x)
    assert torch.allclose(inter.layer_hiddens[1], h1, atol=1e-6)
    assert [h is g for h, g in zip(inter.hiddens, inter.layer_hiddens[0::2])] == [True, True]
    assert inter.cache_length == 5 and inter.cache is not None


def test_return_hiddens_of_a_bidirectional_stack_holds_no_cache():
    net = _stack(Encoder)
    x = torch.randn(1, 4, 32)
    _, inter = net(x, return_hiddens=True)
    assert inter.cache is None
    with pytest.raises(ValueError, match="holds no key/value cache"):
        net(x, cache=inter, return_hiddens=True)
    with pytest.raises(ValueError, match="return_hiddens=True"):
        _stack()(x, cache=inter)


def test_return_hiddens_is_functional_and_takes_the_last_cache_age_columns():
    net = _stack(rotary_pos_emb=True)
    x = torch.randn(1, 9, 32)
    full = net(x)
    _, inter = net(x[:, :6], return_hiddens=True)
    a, _ = net(x[:, :8], cache=inter, cache_age=2, return_hiddens=True)  # tokens 6, 7 are new
    b, _ = net(x[:, 6:7], cache=inter, return_hiddens=True)  # the same Intermediates again: unchanged
    assert torch.allclose(a, full[:, 6:8], atol=1e-5) and torch.allclose(b, full[:, 6:7], atol=1e-5)


def test_repeat_blocks_runs_units_again_in_place():
    net = _stack()  # depth 2: units (a f) (a f)
    x = torch.randn(2, 5, 32)
    # unit 0 twice, then unit 1: the same as running the blocks 0 1 0 1 2 3 by hand
    h = x
    for i in (0, 1, 0, 1, 2, 3):
        h, _ = net.blocks[i](h)
    torch.testing.assert_close(net(x, repeat_blocks=((0, 0), 2)), net.final_norm(h))
    # repeating every unit once is the plain stack; an int start is a one-unit range
    assert torch.equal(net(x, repeat_blocks=((0, 1), 1)), net(x))
    assert torch.equal(net(x, repeat_blocks=(1, 2)), net(x, repeat_blocks=((1, 1), 2)))
    _, inter = net(x, repeat_blocks=((0, 1), 3), return_hiddens=True)
    assert len(inter.layer_hiddens) == 3 * 4 + 1


@pytest.mark.parametrize("kw, call, match", [
    (dict(), dict(repeat_blocks=((0, 2), 2)), "units"),
    (dict(), dict(repeat_blocks=((0, 0), 0)), "times >= 1"),
    (dict(custom_layers=("a", "f", "a", "f")), dict(repeat_blocks=((0, 0), 2)), "custom_layers"),
    (dict(), dict(repeat_blocks=((0, 0), 2), cache=__import__("x_transformers.cache").cache.KVCache()), "a cache"),
])
def test_repeat_blocks_refusals(kw, call, match):
    with pytest.raises(ValueError, match=match):
        _stack(**kw)(torch.randn(1, 4, 32), **call)


def test_float_token_ids_holding_whole_numbers_are_the_integer_ids():
    from x_transformers import TransformerWrapper

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=4)).eval()
    ids = torch.randint(0, 20, (2, 6))
    assert torch.equal(net(ids.float()), net(ids))  # upstream casts them (its test prompts are torch.zeros)
    with pytest.raises(ValueError, match="fractional"):
        net(ids.float() + 0.5)
    with pytest.raises(ValueError, match="integer tensor"):
        net(ids.bool())


def test_muon_parameters_are_upstreams_group():
    from x_transformers.feedforward import FeedForward
    from x_transformers.attention import Attention

    net = Decoder(dim=32, depth=2, heads=4, ff_glu=True, weight_tie_layers=True)
    attn, ff = net.blocks[0].fn, net.blocks[1].fn
    assert isinstance(attn, Attention) and isinstance(ff, FeedForward)
    # attention: the value and output projections; feed-forward: its linear maps' weights
    assert [id(p) for p in attn.muon_parameters()] == [id(attn.to_v.weight), id(attn.to_out.weight)]
    assert {id(p) for p in ff.muon_parameters()} == {id(m.weight) for m in ff.modules()
                                                     if isinstance(m, torch.nn.Linear)}
    # the stack's: each once (weight tying runs one unit twice)
    ids = [id(p) for p in net.muon_parameters()]
    assert len(ids) == len(set(ids)) == 2 + len(list(ff.muon_parameters()))
    assert all(p.ndim == 2 for p in net.muon_parameters())
    from x_transformers import TransformerWrapper
    lm = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=net)
    assert [id(p) for p in lm.muon_parameters()] == ids


@pytest.mark.parametrize("kw", [dict(), dict(rotary_pos_emb=True, alibi_pos_bias=True), dict(attn_num_mem_kv=2)])
def test_causal_override_is_the_other_stack(kw):
    dec, enc = _stack(Decoder, **kw), _stack(Encoder, **kw)
    enc.load_state_dict(dec.state_dict())
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(dec(x, causal=False), enc(x))
    torch.testing.assert_close(enc(x, causal=True), dec(x))
    assert torch.equal(dec(x, causal=True), dec(x))  # the stack's own value changes nothing


def test_causal_override_through_the_wrapper():
    from x_transformers import TransformerWrapper

    torch.manual_seed(0)
    dec = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=4)).eval()
    enc = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=Encoder(dim=32, depth=1, heads=4)).eval()
    enc.load_state_dict(dec.state_dict())
    ids = torch.randint(0, 20, (2, 6))
    torch.testing.assert_close(dec(ids, causal=False), enc(ids))
    logits, inter = dec(ids, causal=False, return_intermediates=True)
    assert inter.cache is None  # a bidirectional call cannot be continued from a cache


@pytest.mark.parametrize("kw, call, match", [
    (dict(), dict(causal=False, cache=__import__("x_transformers.cache").cache.KVCache()), "a cache"),
    (dict(rel_pos_bias=True), dict(causal=False), "rel_pos_bias"),
    (dict(shift_tokens=1), dict(causal=False), "shift_tokens"),
    (dict(), dict(causal="no"), "True or False"),
])
def test_causal_override_refusals(kw, call, match):
    with pytest.raises(ValueError, match=match):
        _stack(**kw)(torch.randn(1, 4, 32), **call)


def test_additional_key_values_are_prepended_to_self_attention():
    from x_transformers.cache import KVCache

    torch.manual_seed(0)
    net = _stack(attn_kv_heads=2)  # 4 query heads over 2 key/value heads
    x = torch.randn(2, 5, 32)
    # another model's cache: its keys/values of 3 earlier tokens per self-attention layer
    other = _stack(attn_kv_heads=2)
    cache = KVCache()
    other(torch.randn(2, 3, 32), cache=cache)
    kvs = [(cache.layer(i).k, cache.layer(i).v) for i in (0, 2)]
    out = net(x, self_attn_additional_kv=kvs)
    # the same as a layer whose own cache held them before this call's keys: run each layer by hand
    ref_cache = KVCache()
    for layer, (k, v) in zip((0, 2), kvs):
        ref_cache.layer(layer).k, ref_cache.layer(layer).v = k, v
    h = x
    for i, block in enumerate(net.blocks):
        if i in (0, 2):
            keys = (ref_cache.layer(i).k, ref_cache.layer(i).v)
            h, _ = block(h, additional_kv=(*keys, None))
        else:
            h, _ = block(h)
    torch.testing.assert_close(out, net.final_norm(h))
    # the keys are seen by every query (a causal stack's mask does not hide them) and a mask hides them
    only_first = net(x, self_attn_additional_kv=kvs, additional_kv_mask=torch.tensor([[True, False, False]] * 2))
    torch.testing.assert_close(only_first, net(x, self_attn_additional_kv=[(k[:, :, :1], v[:, :, :1]) for k, v in kvs]))
    all_hidden = net(x, self_attn_additional_kv=kvs, additional_kv_mask=torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(all_hidden, net(x))
    # only the top layers get them when fewer pairs than self-attentions are given
    top = net(x, self_attn_additional_kv=kvs[1:])
    h, _ = net.blocks[0](x)
    h, _ = net.blocks[1](h)
    h, _ = net.blocks[2](h, additional_kv=(*kvs[1], None))
    h, _ = net.blocks[3](h)
    torch.testing.assert_close(top, net.final_norm(h))


def test_cross_attention_kv_residuals_add_to_each_layers_context():
    net = _stack(cross_attend=True)
    x, ctx = torch.randn(2, 4, 32), torch.randn(2, 3, 32)
    r = torch.randn(2, 2, 3, 32)
    out = net(x, context=ctx, cross_attn_kv_residuals=r)
    h = x
    contexts = iter((ctx + r[0], ctx + r[1]))
    for spec, block in zip(net.layout, net.blocks):
        h, _ = block(h, context=next(contexts)) if spec.kind == "c" else block(h)
    torch.testing.assert_close(out, net.final_norm(h))
    # one (b, m, d) tensor: the first cross-attention only
    first = net(x, context=ctx, cross_attn_kv_residuals=r[0])
    assert torch.allclose(first, net(x, context=ctx, cross_attn_kv_residuals=torch.stack((r[0], 0 * r[1]))), atol=1e-6)


def test_token_emb_and_to_logits_kwargs_reach_custom_modules():
    from torch import nn
    from x_transformers import TransformerWrapper

    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(20, 32), nn.Embedding(20, 32)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    class Pointer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, h, table):
            return self.proj(h) @ table.transpose(-1, -2)

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=4),
                             token_emb=TwoTables(), to_logits=Pointer()).eval()
    x, y, table = torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2, 5)), torch.randn(2, 20, 32)
    logits = net(x, token_emb_kwargs=dict(y=y), to_logits_kwargs=dict(table=table))
    # by hand: the embedding of (x, y) through the stack, then the pointer head over the table
    emb = net.token_emb(x, y) + net.pos_emb(torch.arange(5)[None])
    hidden = net.attn_layers(emb, positions=torch.arange(5)[None])
    torch.testing.assert_close(logits, net.to_logits(hidden, table), atol=1e-5, rtol=1e-5)
    plain = TransformerWrapper(num_tokens=20, max_seq_len=8, attn_layers=Decoder(dim=32, depth=1, heads=4))
    with pytest.raises(ValueError, match="custom token_emb"):
        plain(x, token_emb_kwargs=dict(y=y))
    assert plain(x, token_emb_kwargs={}, to_logits_kwargs={}).shape == (2, 5, 20)


def test_per_call_key_values_refused_on_a_reversible_stack():
    net = _stack(reversible=True, cross_attend=True)
    x, ctx = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="reversible"):
        net(x, context=ctx, cross_attn_kv_residuals=torch.randn(1, 3, 32))
