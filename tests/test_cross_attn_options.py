"""Upstream's ``cross_attn_`` prefix (layout.py's pop_cross_attn): an attention option for the
cross-attention blocks only, over the ``attn_`` value they share with self-attention, one value or a
tuple of one per cross-attention block; options the whole stack or only self-attention reads are
refused under it, naming the keyword. Inverted attention with sigmoid weights (upstream's pairing)
against its formula."""

import pytest
import torch

from x_transformers import CrossAttender, Decoder, Encoder
from x_transformers.config import ConfigConflictError


def blocks(stack, kind):
    return [b.fn for b, s in zip(stack.blocks, stack.layout) if s.kind == kind]


def test_cross_attn_options_reach_the_cross_attention_blocks_only():
    enc = Encoder(dim=32, depth=3, heads=4, cross_attend=True, attn_head_scale=True, cross_attn_head_scale=False,
                  cross_attn_sigmoid=True, cross_attn_inverted_attention=(True, False, True))
    cross, own = blocks(enc, "c"), blocks(enc, "a")
    assert [c.cfg.sigmoid for c in cross] == [True] * 3 and [a.cfg.sigmoid for a in own] == [False] * 3
    assert [c.inverted for c in cross] == [True, False, True] and not any(a.inverted for a in own)
    # an attn_ option reaches both kinds unless cross_attn_ overrides it for the cross-attention blocks
    assert all(a.cfg.head_scale for a in own) and not any(c.cfg.head_scale for c in cross)
    assert all(a.head_scale is not None for a in own) and all(c.head_scale is None for c in cross)


def test_cross_attn_option_on_a_cross_attender_is_its_attn_option():
    """A CrossAttender has only cross-attention blocks: cross_attn_X builds (and computes) what attn_X does."""
    kw = dict(dim=32, depth=2, heads=4, dim_context=16)
    torch.manual_seed(0)
    ours = CrossAttender(**kw, cross_attn_sigmoid=True, cross_attn_inverted_attention=(True, False)).eval()
    ref = CrossAttender(**kw, attn_sigmoid=True).eval()
    ref.load_state_dict(ours.state_dict())
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 5:] = False
    # with the first block plain too, the two stacks agree; the inverted first block makes them differ
    plain = CrossAttender(**kw, cross_attn_sigmoid=True).eval()
    plain.load_state_dict(ours.state_dict())
    torch.testing.assert_close(plain(x, context=ctx, context_mask=keep), ref(x, context=ctx, context_mask=keep))
    assert (ours(x, context=ctx, context_mask=keep) - ref(x, context=ctx, context_mask=keep)).abs().max() > 1e-4


def test_inverted_attention_with_sigmoid_weights_is_sigmoid_then_l1_over_keys():
    torch.manual_seed(0)
    stack = CrossAttender(dim=32, depth=1, heads=4, attn_dim_head=8, cross_attn_inverted_attention=True,
                          cross_attn_sigmoid=True).eval()
    c = stack.blocks[0].fn
    x, ctx = torch.randn(2, 4, 32), torch.randn(2, 5, 32)
    ctx_keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    _, w = c(x, ctx, mask=ctx_keep[:, None, None, :], need_weights=True)
    s = (c.to_q(x).view(2, 4, 4, 8).transpose(1, 2) @ c.to_k(ctx).view(2, 5, 4, 8).transpose(1, 2).transpose(-1, -2)
         * 8 ** -0.5)
    expect = s.sigmoid() * ctx_keep[:, None, None, :]
    torch.testing.assert_close(w, expect / expect.sum(-1, keepdim=True))
    # a padded query changes no other query's output (sigmoid weights are per entry)
    keep = torch.tensor([[True, True, True, False]] * 2)
    torch.testing.assert_close(stack(x, mask=keep, context=ctx, context_mask=ctx_keep)[:, :3],
                               stack(x[:, :3], context=ctx, context_mask=ctx_keep))


@pytest.mark.parametrize("kw, error, message", [
    (dict(cross_attn_max_attend_past=4), ValueError, "cross_attn_max_attend_past: attn_max_attend_past is read by"),
    (dict(cross_attn_dim_head=16), ValueError, "cross_attn_dim_head"),
    (dict(cross_attn_sigmoid=(True, False)), ValueError, r"cross_attn_sigmoid as a tuple needs one value per "
                                                         r"cross-attention block \(3\), got 2"),
    (dict(cross_attn_inverted_attention=True, cross_attn_use_entmax15=True), ConfigConflictError,
     "in the cross-attention blocks .cross_attn_ options.*attn_inverted_attention"),
    (dict(cross_attn_sigmoidd=True), TypeError, "cross_attn_sigmoidd"),
])
def test_cross_attn_refusals_name_the_keyword(kw, error, message):
    with pytest.raises(error, match=message):
        Encoder(dim=32, depth=3, heads=4, cross_attend=True, **kw)


def test_cross_attn_options_need_cross_attention_and_inverted_needs_a_bidirectional_stack():
    with pytest.raises(ValueError, match="cross_attn_sigmoid: this stack has no cross-attention blocks"):
        Encoder(dim=32, depth=2, heads=4, cross_attn_sigmoid=True)
    with pytest.raises(ConfigConflictError, match="in the cross-attention blocks .*causal"):
        Decoder(dim=32, depth=2, heads=4, cross_attend=True, cross_attn_inverted_attention=True)
