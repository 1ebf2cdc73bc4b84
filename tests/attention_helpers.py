"""Helpers of the attention tests (test_attention.py, test_attention_scores.py): the first
attention block of a one-layer stack, inputs, hand-computed logits. Legend: b batch, h heads, n queries,
m keys, d head dim."""

import torch

from x_transformers import Decoder, Encoder

DIM, HEADS, D = 32, 4, 8



def attention(causal=False, seed=0, **kw):
    """The first self-attention block of a one-layer Encoder / Decoder built with ``kw``."""
    torch.manual_seed(seed)
    kw.setdefault("attn_dim_head", D)  # the tests' shapes use d = DIM // HEADS
    stack = (Decoder if causal else Encoder)(dim=DIM, depth=1, heads=HEADS, **kw)
    return stack.blocks[0].fn.eval()


def inputs(b=2, n=8, seed=1, scale=1.0):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed)) * scale


def copy_weights(dst, src):
    """Load ``src``'s weights into ``dst``; returns the names ``dst`` has beyond them."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected, unexpected
    return set(missing)


def sharpen(*blocks, factor=30.0):
    """Scale q/k projections so that attention is far from uniform (init weights are tiny)."""
    with torch.no_grad():
        for a in blocks:
            for lin in (a.to_q, a.to_k):
                if lin is not None:
                    lin.weight.mul_(factor)


def heads(t, h):
    b, n, _ = t.shape
    return t.view(b, n, h, -1).transpose(1, 2)  # (b, n, h*d) -> (b, h, n, d)


def plain_logits(a, x):
    """q k^T / sqrt(d) of a plain block, computed by hand: (b, h, n, m)."""
    q, k = heads(a.to_q(x), a.heads), heads(a.to_k(x), a.kv_heads)
    return q @ k.transpose(-1, -2) * a.dim_head ** -0.5


def weights(a, x, **kw):
    return a(x, need_weights=True, **kw)[1]


def key_mask(keep):
    """(b, m) bool -> the (b, 1, 1, m) key mask an Attention block takes."""
    return keep[:, None, None, :]


def assert_cache_decoding_equals_full_forward(net):
    """Prefill 3 tokens, then decode one at a time, with the dynamic and the static cache: the
    logits equal the full forward's."""
    from x_transformers.cache import KVCache, StaticKVCache

    net.eval()
    x = torch.randint(0, 20, (2, 9))
    full = net(x)
    for cache in (KVCache(), StaticKVCache.for_model(net, 2, 9)):
        steps = [net(x[:, :3], cache=cache)] + [net(x[:, t:t + 1], cache=cache) for t in range(3, 9)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
