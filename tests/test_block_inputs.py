"""transform_block_inputs and block_hiddens (block_inputs.py): identity transforms change nothing,
a transform at depth d changes only blocks >= d and sees exactly block d - 1's output, depths count
blocks (units) as upstream, the cache stays exact under transforms, refused kinds raise first."""

from __future__ import annotations

import pytest
import torch

from x_transformers import CrossAttender, Decoder, Encoder, PrefixDecoder, TransformerWrapper
from x_transformers.cache import KVCache
from x_transformers.funnel import FunnelEncoder

D, V = 16, 20


def _stacks():
    torch.manual_seed(0)
    return dict(decoder=Decoder(dim=D, depth=3, heads=2), encoder=Encoder(dim=D, depth=3, heads=2),
                prefix=PrefixDecoder(dim=D, depth=3, heads=2, prefix_attn_len=2),
                cross=CrossAttender(dim=D, depth=3, heads=2),
                macaron=Decoder(dim=D, depth=3, heads=2, macaron=True),
                custom=Decoder(dim=D, depth=2, heads=2, custom_layers=("a", "f", "a", "a", "f")))


def _call(stack, x, **kw):
    ctx = dict(context=torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))) \
        if stack.needs_context else {}
    return stack(x, return_hiddens=True, **ctx, **kw)


@pytest.mark.parametrize("kind", ["decoder", "encoder", "prefix", "cross", "macaron", "custom"])
def test_identity_transforms_change_nothing_and_blocks_count_units(kind):
    stack = _stacks()[kind].eval()
    x = torch.randn(2, 6, D)
    out, inter = _call(stack, x)
    count = {"custom": 5}.get(kind, 3)  # units of a f / a c f / f a f; one layer each on custom_layers
    assert len(inter.block_hiddens) == count
    assert torch.equal(inter.block_hiddens[-1], out)
    ident = {d: (lambda s: s) for d in range(1, count + 1)}
    for transforms in (ident, lambda depth, s: s):
        again, inter2 = _call(stack, x, transform_block_inputs=transforms)
        assert torch.equal(again, out)
        assert all(torch.equal(a, b) for a, b in zip(inter.block_hiddens, inter2.block_hiddens))
    with pytest.raises(ValueError, match=f"transform_block_inputs: depths count blocks from 1 to {count}"):
        _call(stack, x, transform_block_inputs={count + 1: lambda s: s})


@pytest.mark.parametrize("kind", ["decoder", "macaron", "custom"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_transform_at_depth_d_changes_only_blocks_from_d_and_sees_block_d_minus_1_output(kind, depth):
    stack = _stacks()[kind].eval()
    x = torch.randn(2, 6, D)
    _, plain = _call(stack, x)
    seen = []

    def shift(s):
        seen.append(s.clone())
        return s * 1.5 + 0.25

    _, moved = _call(stack, x, transform_block_inputs={depth: shift})
    assert len(seen) == 1
    assert torch.equal(seen[0], x if depth == 1 else plain.block_hiddens[depth - 2])  # the stream entering block d
    for d, (a, b) in enumerate(zip(plain.block_hiddens, moved.block_hiddens), start=1):
        assert torch.equal(a, b) == (d < depth), d


def test_the_wrapper_applies_depth_1_to_the_token_embeddings_before_positions():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=D, depth=2, heads=2)).eval()
    x = torch.randint(0, V, (2, 7))
    seen = []
    base, inter = net(x, return_intermediates=True)
    out = net(x, transform_block_inputs={1: lambda s: seen.append(s) or s})
    assert torch.equal(seen[0], net.token_emb(x)) and torch.equal(out, base)
    # the same transform written on the embeddings by hand: a zeroed token embedding leaves positions only
    zero = net(x, transform_block_inputs={1: lambda s: s * 0})
    stack_in = net.post_emb_norm(net.pos_emb(torch.arange(7)[None])) if net.post_emb_norm is not None \
        else net.pos_emb(torch.arange(7)[None])
    by_hand = net.logits_from(net.attn_layers(stack_in.expand(2, -1, -1)))
    torch.testing.assert_close(zero, by_hand)
    assert len(inter.block_hiddens) == 2 and torch.equal(inter.block_hiddens[-1], inter.last_hidden)


def test_the_cache_stays_exact_while_block_inputs_are_transformed():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=D, depth=3, heads=2,
                                                                              rotary_pos_emb=True)).eval()
    w = torch.randn(D, D) * 0.3
    transforms = {1: lambda s: s + 0.5, 2: lambda s: s @ w + s, 3: lambda s: s.tanh()}  # per position
    x = torch.randint(0, V, (2, 9))
    full = net(x, transform_block_inputs=transforms)
    logits, inter = net(x[:, :5], transform_block_inputs=transforms, return_intermediates=True)
    steps = [logits]
    for t in range(5, 9):  # upstream's convention: the whole sequence so far, the cache holds the rest
        logits, inter = net(x[:, :t + 1], cache=inter, transform_block_inputs=transforms, return_intermediates=True)
        assert len(inter.block_hiddens) == 3 and inter.block_hiddens[0].shape[1] == 1
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # a KVCache extended in place, one token at a time, agrees too
    kv, outs = KVCache(), []
    for t in range(9):
        outs.append(net(x[:, t:t + 1], cache=kv, transform_block_inputs=transforms))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def _never(s):
    raise AssertionError("the transform ran before the refusal")


@pytest.mark.parametrize("build, why", [
    (lambda: Decoder(dim=D, depth=2, heads=2, reversible=True), "reversible=True"),
    (lambda: Decoder(dim=D, depth=2, heads=2, num_residual_streams=2), "hyper-connections"),
])
def test_refused_stacks_raise_one_line_before_any_work(build, why):
    stack = build()
    with pytest.raises(ValueError, match=f"transform_block_inputs is not supported with {why}") as err:
        stack(torch.randn(2, 4, D), transform_block_inputs={2: _never})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="repeat_blocks"):
        Decoder(dim=D, depth=2, heads=2)(torch.randn(2, 4, D), repeat_blocks=(0, 2), transform_block_inputs={2: _never})
    net = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=D, depth=2, heads=2))
    with pytest.raises(ValueError, match="transform_block_inputs is not supported with repeat_blocks"):
        net(torch.randint(0, V, (2, 4)), repeat_blocks=(0, 2), transform_block_inputs={1: _never})


@pytest.mark.parametrize("net_kwargs, attn, why", [
    (dict(looped=True), lambda: Decoder(dim=D, depth=2, heads=2, pre_and_post_norm=True), "looped / recycling"),
    (dict(recycling=True), lambda: Decoder(dim=D, depth=2, heads=2), "looped / recycling"),
    ({}, lambda: FunnelEncoder(dim=D, depths=(1, 1), heads=2), "a FunnelEncoder"),
])
def test_refused_wrappers_raise_one_line_before_any_work(net_kwargs, attn, why):
    net = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=attn(), **net_kwargs)
    with pytest.raises(ValueError, match=f"transform_block_inputs is not supported with {why}"):
        net(torch.randint(0, V, (2, 8)), transform_block_inputs={1: _never})


def test_bad_transforms_are_one_line_errors_naming_the_argument():
    stack = Decoder(dim=D, depth=2, heads=2)
    x = torch.randn(2, 4, D)
    for bad, msg in ((["x"], "must be a dict"), ({0: lambda s: s}, "depths count blocks from 1 to 2"),
                     ({True: lambda s: s}, "depths count blocks"), ({1: "f"}, r"transform_block_inputs\[1\] must be a callable"),
                     ({2: lambda s: s[:, :1]}, r"transform_block_inputs\[2\] must return the stream's shape")):
        with pytest.raises(ValueError, match=msg):
            stack(x, transform_block_inputs=bad)


def test_wrapper_intermediates_hold_upstreams_hiddens_and_layer_hiddens():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=D, depth=2, heads=2)).eval()
    x = torch.randint(0, V, (2, 7))
    _, inter = net(x, return_intermediates=True)
    _, direct = net.attn_layers(net.post_emb_norm(net.token_emb(x) + net.pos_emb(torch.arange(7)[None]))
                                if net.post_emb_norm is not None else net.token_emb(x) + net.pos_emb(torch.arange(7)[None]),
                                return_hiddens=True)
    for name in ("hiddens", "layer_hiddens", "block_hiddens"):
        ours, theirs = getattr(inter, name), getattr(direct, name)
        assert len(ours) == len(theirs) and all(torch.allclose(a, b) for a, b in zip(ours, theirs)), name
    assert len(inter.hiddens) == 2 and torch.allclose(inter.hiddens[1], inter.block_hiddens[0])
