"""Residual attention (RealFormer, 2012.11747: ``residual_attn`` / ``cross_residual_attn``) and
xPos (2212.10554: ``rotary_xpos``), each against a reference computed here from the model's own
weights, with gradients and cache agreement. Legend: b batch, h heads, n queries, m keys, d head dim."""

import pytest
import torch

from attention_helpers import assert_cache_decoding_equals_full_forward, heads
from x_transformers import CrossAttender, Decoder, Encoder, TransformerWrapper
from x_transformers.attend import BackendNotSupported, attend
from x_transformers.config import ConfigConflictError
from x_transformers.positional import RotaryEmbedding, apply_rotary, key_rotary

DIM, H = 16, 2


def _inputs_of(stack, x, **kw):
    """The normalised input each attention block's fn receives, in block order."""
    seen = []
    hooks = [b.fn.register_forward_hook(lambda m, a, o: seen.append(a[0])) for b in stack.blocks
             if type(b.fn).__name__ == "Attention"]
    out = stack(x, return_attn=True, **kw)
    for hk in hooks:
        hk.remove()
    return seen, out[1]


def _scores(a, x, context=None):
    src = x if context is None else context
    q, k = heads(a.to_q(x), a.heads), heads(a.to_k(src), a.kv_heads)
    return q @ k.transpose(-1, -2) * a.dim_head ** -0.5  # (b, h, n, m)


def test_attend_adds_previous_scores_and_returns_its_own():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    prev = torch.randn(2, 2, 5, 5, generator=g)
    sink = []
    out, _ = attend(q, k, v, causal=True, prev_scores=prev, scores_out=sink)
    scores = q @ k.transpose(-1, -2) * 0.5 + prev
    torch.testing.assert_close(sink[0], scores)  # pre-softmax, before masking
    ref = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref)
    with pytest.raises(BackendNotSupported, match="residual attention"):
        attend(q, k, v, prev_scores=prev, force_backend="sdpa")


@pytest.mark.parametrize("causal", [True, False])
def test_residual_attn_adds_each_layers_scores_to_the_next(causal):
    torch.manual_seed(0)
    stack = (Decoder if causal else Encoder)(dim=DIM, depth=3, heads=H, attn_dim_head=8, residual_attn=True).eval()
    x = torch.randn(2, 6, DIM)
    mask = torch.tensor([[True] * 6, [False, True, True, True, True, True]])
    with torch.no_grad():
        for b in stack.blocks:
            if hasattr(b.fn, "to_q"):
                b.fn.to_q.weight.mul_(20)
        inputs, weights = _inputs_of(stack, x, mask=mask)
        keep = mask[:, None, None, :] & (torch.ones(6, 6).tril().bool() if causal else True)
        total = 0
        for a_in, w, block in zip(inputs, weights, [b for b in stack.blocks if hasattr(b.fn, "to_q")]):
            total = total + _scores(block.fn, a_in)  # the running sum of every layer's scores so far
            ref = total.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)  # a row seeing nothing: 0
            torch.testing.assert_close(w, ref, atol=1e-5, rtol=1e-5)
    plain = (Decoder if causal else Encoder)(dim=DIM, depth=3, heads=H, attn_dim_head=8).eval()
    plain.load_state_dict(stack.state_dict())  # no parameters of its own: the layers differ only in the sum
    assert not torch.allclose(plain(x), stack(x))


def test_cross_residual_attn_chains_cross_attention_scores():
    torch.manual_seed(0)
    stack = CrossAttender(dim=DIM, depth=2, heads=H, attn_dim_head=8, cross_residual_attn=True).eval()
    x, ctx = torch.randn(2, 4, DIM), torch.randn(2, 5, DIM)
    with torch.no_grad():
        inputs, weights = _inputs_of(stack, x, context=ctx)
        attn = [b.fn for b in stack.blocks if hasattr(b.fn, "to_q")]
        s1, s2 = _scores(attn[0], inputs[0], ctx), _scores(attn[1], inputs[1], ctx)
        torch.testing.assert_close(weights[1], (s1 + s2).softmax(-1), atol=1e-5, rtol=1e-5)


def test_residual_attn_gradients_and_cache_agreement():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=H, attn_dim_head=8, residual_attn=True, attn_num_mem_kv=2, rotary_xpos=True))
    net(torch.randint(0, 20, (2, 7))).sum().backward()
    first = net.attn_layers.blocks[0].fn
    assert first.to_q.weight.grad.abs().sum() > 0  # the first layer's scores reach the last layer too
    assert_cache_decoding_equals_full_forward(net)


@pytest.mark.parametrize("kw", [dict(residual_attn=True, reversible=True), dict(cross_residual_attn=True,
                         cross_attend=True, attn_backend="sdpa")])
def test_residual_attn_refusals_are_declared(kw):
    with pytest.raises(ConfigConflictError) as e:
        Decoder(dim=DIM, depth=2, heads=H, **kw)
    assert e.value.conflict is not None


def test_xpos_scales_are_the_papers_and_logits_depend_on_distance_only():
    r, base = 8, 4.0
    rot = RotaryEmbedding(r, xpos_scale_base=base)
    pos = torch.arange(0, 12)[None]
    cos, sin, scale = rot(pos)
    zeta = (torch.arange(0, r, 2) + 0.4 * r) / (1.4 * r)
    torch.testing.assert_close(scale[0, 0, 5, : r // 2], zeta ** (5 / base))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, r, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, r, generator=g,
                                                                                      dtype=torch.float64)

    def logit(i, j):
        qi = apply_rotary(q, *[t[:, :, i:i + 1].double() for t in (cos, sin, scale)])
        kj = apply_rotary(k, *[t[:, :, j:j + 1].double() for t in key_rotary((cos, sin, scale))])
        return (qi * kj).sum()

    torch.testing.assert_close(logit(7, 3), logit(11, 7))  # shift invariance, as rotary
    # the decay: each channel pair's plain-rotary term times zeta_k ** ((i - j) / B)
    plain = RotaryEmbedding(r)(pos)
    qi = apply_rotary(q, *[t[:, :, 9:10].double() for t in plain])
    kj = apply_rotary(k, *[t[:, :, 2:3].double() for t in plain])
    terms = (qi * kj)[0, 0, 0]  # (r,), pair c in channels c and c + r / 2
    ref = sum(zeta[c].double() ** (7 / base) * (terms[c] + terms[c + r // 2]) for c in range(r // 2))
    torch.testing.assert_close(logit(9, 2), ref)


def test_xpos_is_causal_only_and_switches_rotary_on():
    with pytest.raises(ConfigConflictError, match="rotary_xpos"):
        Encoder(dim=DIM, depth=1, heads=H, rotary_xpos=True)
    d = Decoder(dim=DIM, depth=1, heads=H, attn_dim_head=8, rotary_xpos=True, rotary_xpos_scale_base=64)
    assert d.rotary.xpos_scale_base == 64 and d.has_relative_positions
    with pytest.raises(ValueError, match="rotary_xpos"):
        Decoder(dim=DIM, depth=1, heads=H, rotary_xpos_scale_base=64)


def test_rel_pos_kwargs_give_alibi_its_own_slopes():
    torch.manual_seed(0)
    own = Decoder(dim=DIM, depth=1, heads=2, attn_dim_head=8, alibi_pos_bias=True, rel_pos_kwargs=dict(slopes=[1, 0.25]))
    pos = torch.arange(4)[None]
    dist = (pos[0, :, None] - pos[0, None, :]).abs().float()
    torch.testing.assert_close(own.rel_pos(pos, pos)[0], -torch.stack((dist, 0.25 * dist)))
    Decoder(dim=DIM, depth=1, heads=2, rel_pos_kwargs={})  # upstream's default spelled out
    for bad in (dict(slopes=[1.0]), dict(scale=2)):
        with pytest.raises(ValueError, match="rel_pos_kwargs"):
            Decoder(dim=DIM, depth=1, heads=2, alibi_pos_bias=True, rel_pos_kwargs=bad)
    with pytest.raises(ValueError, match="alibi_pos_bias=True"):
        Decoder(dim=DIM, depth=1, heads=2, rel_pos_kwargs=dict(slopes=[1, 1]))
