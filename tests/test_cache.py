"""KVCache / StaticKVCache: agreement, reorder, errors, and a decode step that compiles once."""

import pytest
import torch

from x_transformers import Decoder, Encoder, KVCache, StaticKVCache, TransformerWrapper, XTransformer
from x_transformers.autoregressive import decode_step, prefill

V = 29


def net(seed=0, **layers):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=4, **layers)).eval()


def test_caching_a_bidirectional_stack_raises():
    enc = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=4))
    x = torch.randint(0, V, (1, 4))
    with pytest.raises(ValueError, match="causal"):
        enc(x, cache=KVCache())
    with pytest.raises(ValueError, match="causal"):
        StaticKVCache.for_model(enc, 1, 8)
    xt = XTransformer(dim=32, depth=1, heads=4, num_tokens=V, max_seq_len=16)
    with pytest.raises(ValueError, match="causal"):
        xt.encoder(x, cache=KVCache())


def test_static_cache_overflow_raises():
    model = net()
    cache = StaticKVCache.for_model(model, 1, 5)
    model(torch.randint(0, V, (1, 4)), cache=cache)
    model(torch.randint(0, V, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.randint(0, V, (1, 1)), cache=cache)


@pytest.mark.parametrize("layers", [dict(), dict(rotary_pos_emb=True, attn_shared_qk=True)])
def test_reorder_selects_rows_in_both_caches(layers):
    model = net(**layers)
    x = torch.randint(0, V, (3, 7))
    index = torch.tensor([2, 2, 0])
    ref = model(x[index])
    for cache in (KVCache(), StaticKVCache.for_model(model, 3, 7)):
        first = model(x[:, :4], cache=cache)
        cache.reorder(index)
        rest = torch.cat([model(x[index, t:t + 1], cache=cache) for t in range(4, 7)], dim=1)
        torch.testing.assert_close(first[index], ref[:, :4], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rest, ref[:, 4:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [dict(), dict(rotary_pos_emb=True)], ids=["plain", "rotary"])
def test_static_decode_step_compiles_once_without_graph_breaks(layers):
    """fullgraph=True fails on any graph break; error_on_recompile fails on any recompile after
    the first two steps. The compiled step must also give the eager logits."""
    torch._dynamo.reset()
    model = net(**layers)
    x = torch.randint(0, V, (2, 12))
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 0] = False  # a left-padded row
    step = torch.compile(decode_step, backend="aot_eager", fullgraph=True)
    caches = [StaticKVCache.for_model(model, 2, 12) for _ in range(2)]
    outs = [prefill(model, x[:, :4], mask, c) for c in caches]
    with torch.no_grad():
        for t in range(4, 12):
            if t == 6:  # two compiled steps done: from here on, a recompile is an error
                torch._dynamo.config.error_on_recompile = True
            try:
                got = step(model, x[:, t:t + 1], caches[0])
            finally:
                torch._dynamo.config.error_on_recompile = False
            want = decode_step(model, x[:, t:t + 1], caches[1])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()
