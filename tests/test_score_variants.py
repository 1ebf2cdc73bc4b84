"""How scores become weights beyond softmax (score_variants.py, issue 20): hard and Gumbel attention,
straight-through top-k, selective attention, inverted cross-attention, pre-scale-post talking
heads. Each against its formula computed here, with its gradient where it is the point, and cache
agreement for those the property harness leaves out."""

import pytest
import torch

from attention_helpers import (DIM, HEADS, assert_cache_decoding_equals_full_forward, attention, heads, inputs,
                               plain_logits, sharpen, weights)
from x_transformers import CrossAttender, Decoder, TransformerWrapper
from x_transformers.attend import attend
from x_transformers.cache import KVCache


def qkv(n=6, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, n, 8, generator=g).requires_grad_(True)
    return q, torch.randn(2, 3, m, 8, generator=g), torch.randn(2, 3, m, 8, generator=g)


def _grad(out, q, seed=1):
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * probe).sum(), q, retain_graph=True)[0]


def test_hard_attention_takes_the_argmax_value_with_softmaxs_gradient():
    q, k, v = qkv()
    out, w = attend(q, k, v, causal=True, normalizer="hard", need_weights=True)
    logits = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), 6).float()
    torch.testing.assert_close(w, one_hot)
    torch.testing.assert_close(out, one_hot @ v)
    soft, _ = attend(q, k, v, causal=True)
    torch.testing.assert_close(_grad(out, q), _grad(soft, q))


def test_gumbel_samples_keys_at_softmax_frequencies_and_is_its_mode_in_eval():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    k = torch.eye(4, 8)  # q . k_j = logits[j] with q = logits padded
    q = torch.nn.functional.pad(logits, (0, 4)).expand(1, 1, 20000, 8)
    v = torch.eye(4, 8)[None, None]
    out, _ = attend(q, k[None, None], v, scale=1.0, normalizer="gumbel", sample=True)
    assert set(out[0, 0, :, :4].sum(-1).unique().tolist()) == {1.0}  # one-hot rows (hard samples)
    freq = out[0, 0, :, :4].mean(0)
    torch.testing.assert_close(freq, logits.softmax(-1), atol=0.015, rtol=0)  # Gumbel-max
    soft, _ = attend(q[:, :, :1], k[None, None], v, scale=1.0, normalizer="gumbel", gumbel_hard=False,
                     gumbel_temp=2.0, sample=False)
    torch.testing.assert_close(soft[0, 0, 0, :4], (logits / 2.0).softmax(-1))
    mode, _ = attend(q[:, :, :1], k[None, None], v, scale=1.0, normalizer="gumbel", sample=False)
    torch.testing.assert_close(mode[0, 0, 0, :4], torch.tensor([1.0, 0, 0, 0]))


def test_gumbel_attention_samples_in_training_and_is_deterministic_in_eval():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=1, heads=HEADS, attn_dim_head=8, attn_gumbel_softmax=True, attn_gumbel_softmax_temp=0.5))
    x = torch.randint(0, 20, (2, 6))
    assert not torch.equal(net.train()(x), net(x))  # sampled
    net.eval()
    assert torch.equal(net(x), net(x))


# (the ones the property harness does not register: tests/features/attention_variants.py)
@pytest.mark.parametrize("kw", [dict(attn_gumbel_softmax=True, attn_gumbel_softmax_temp=0.5), dict(attn_hard=True),
                                dict(attn_sparse_topk=2, attn_sparse_topk_straight_through=True),
                                dict(attn_pre_scale_post_talking_heads=True, attn_num_mem_kv=1),
                                dict(rotary_pos_emb=True, attn_rotate_num_heads=2)])
def test_cache_decoding_equals_the_full_forward(kw):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, **kw))
    assert_cache_decoding_equals_full_forward(net)


def test_straight_through_top_k_is_top_k_forward_with_the_dense_softmax_gradient():
    q, k, v = qkv()
    out, _ = attend(q, k, v, sparse_topk=2, topk_straight_through=True)
    topk, _ = attend(q, k, v, sparse_topk=2)
    dense, _ = attend(q, k, v)
    torch.testing.assert_close(out, topk)
    torch.testing.assert_close(_grad(out, q), _grad(dense, q))
    assert not torch.allclose(_grad(topk, q), _grad(dense, q))


def _selective_reference(s, keep=None):
    """s (b, h, n, n) causal scores: s - F, F[i, j] = sum over i' < i of relu(s[:, 0, i', j]), except
    a token's own key and the first kept key. Loops, written from the paper's definition."""
    b, _, n, _ = s.shape
    out = s.clone()
    for r in range(b):
        first = 0 if keep is None else int(keep[r].float().argmax())
        for i in range(n):
            for j in range(n):
                hide = sum(max(s[r, 0, p, j].item(), 0.0) for p in range(i) if p != j and j != first and j <= p)
                out[r, :, i, j] -= hide
    return out


def test_selective_attention_subtracts_what_earlier_tokens_hide():
    a = attention(causal=True, attn_selective=True)
    sharpen(a, factor=5.0)
    x = inputs(n=5)
    s = plain_logits(a, x)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    masked = s.masked_fill(causal, -1e9)
    expect = _selective_reference(masked).masked_fill(causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(weights(a, x), expect)
    keep = torch.tensor([[True] * 5, [False, True, True, True, True]])  # row 1 left-padded
    ref = _selective_reference(masked.masked_fill(~keep[:, None, None, :], -1e9), keep)
    ref = ref.masked_fill(causal | ~keep[:, None, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(weights(a, x, mask=keep[:, None, None, :])[1, :, 1:], ref[1, :, 1:])
    with pytest.raises(ValueError, match="attn_selective"):
        a(x, cache=KVCache().layer(0))


def test_inverted_attention_normalises_over_queries_then_keys():
    torch.manual_seed(0)
    stack = CrossAttender(dim=DIM, depth=1, heads=HEADS, attn_dim_head=8, attn_inverted_attention=True).eval()
    c = stack.blocks[0].fn
    x, ctx = inputs(n=4), inputs(n=5, seed=2)
    ctx_keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, w = c(x, ctx, mask=ctx_keep[:, None, None, :], need_weights=True)
    s = heads(c.to_q(x), HEADS) @ heads(c.to_k(ctx), HEADS).transpose(-1, -2) * 8 ** -0.5
    expect = s.softmax(dim=-2) * ctx_keep[:, None, None, :]
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(w, expect)
    # a padded query takes no share of any key: the kept queries' outputs are those without it
    keep = torch.tensor([[True, True, True, False]] * 2)
    padded = stack(x, mask=keep, context=ctx, context_mask=ctx_keep)[:, :3]
    torch.testing.assert_close(padded, stack(x[:, :3], context=ctx, context_mask=ctx_keep))


def test_pre_scale_post_talking_heads_scale_the_weights_by_mixed_logits():
    a = attention(attn_pre_scale_post_talking_heads=True)
    x = inputs()
    with torch.no_grad():
        a.scale_mix.normal_()
    s = plain_logits(a, x)
    expect = s.softmax(-1) * torch.einsum("bhnm,hg->bgnm", s, a.scale_mix)
    torch.testing.assert_close(weights(a, x), expect)
    (g,) = torch.autograd.grad(a(x)[0].square().sum(), a.scale_mix)
    assert g.abs().min() > 0


def _squared_softmax(scores):  # a user's normaliser: weights proportional to softmax(s)^2 = softmax(2 s)
    w = scores.softmax(dim=-1).square()
    return w / w.sum(dim=-1, keepdim=True)


def test_custom_attn_fn_normalises_the_masked_scores():
    a = attention(causal=True, attn_custom_attn_fn=_squared_softmax)
    x = inputs()
    keep = torch.ones(8, 8, dtype=torch.bool).tril()
    expected = (2 * plain_logits(a, x)).masked_fill(~keep, float("-inf")).softmax(-1)
    torch.testing.assert_close(weights(a, x), expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=2, heads=HEADS, attn_dim_head=8, attn_custom_attn_fn=_squared_softmax))
    assert_cache_decoding_equals_full_forward(net)
    with pytest.raises(ValueError, match="attn_custom_attn_fn must be callable"):
        Decoder(dim=DIM, depth=1, heads=HEADS, attn_custom_attn_fn="softmax")
