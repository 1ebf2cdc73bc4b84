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


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: takes the cache down its GPU branch on a CPU machine.
    What is computed from it is a plain tensor (no subclass propagation)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return torch.device("cuda")


def test_static_cache_overflow_raises_on_the_single_token_path_whatever_the_device():
    """Issue 16: on CUDA the one-token step skipped the overflow check (it cost a host sync), so
    decoding past max_len wrote out of range. The check now counts on the host, on every device."""
    model = net()
    cache = StaticKVCache.for_model(model, 1, 5)
    cache.index = cache.index.as_subclass(_ReportsCuda)
    model(torch.randint(0, V, (1, 4)), cache=cache)
    model(torch.randint(0, V, (1, 1)), cache=cache)
    with pytest.raises(ValueError, match="static cache is full: 5 of 5 slots used, 1 more needed; build it with a larger max_len"):
        model(torch.randint(0, V, (1, 1)), cache=cache)
    assert cache.length == 5 and int(cache.index) == 5  # the failed step wrote nothing


def test_static_cache_overflow_check_needs_no_device_sync(monkeypatch):
    model = net()
    cache = StaticKVCache.for_model(model, 1, 5)
    model(torch.randint(0, V, (1, 4)), cache=cache)

    def no_sync(*_):
        raise AssertionError("the overflow check read the slot index back to the host")

    cache.index = cache.index.as_subclass(_ReportsCuda)
    monkeypatch.setattr(_ReportsCuda, "__int__", no_sync, raising=False)
    monkeypatch.setattr(_ReportsCuda, "item", no_sync, raising=False)
    decode_step(model, torch.randint(0, V, (1, 1)), cache)
    with pytest.raises(ValueError, match="larger max_len"):
        decode_step(model, torch.randint(0, V, (1, 1)), cache)


def test_compiled_decode_step_past_max_len_raises():
    """Inside a compiled graph the cache cannot count; the compiled step counts for it."""
    from x_transformers.autoregressive import compiled_decoder

    model = net(seed=3)
    cache = StaticKVCache.for_model(model, 1, 6)
    prefill(model, torch.randint(0, V, (1, 4)), None, cache)
    step = compiled_decoder(model, dict(backend="eager"))
    step(model, torch.randint(0, V, (1, 1)), cache)
    step(model, torch.randint(0, V, (1, 1)), cache)
    assert cache.length == 6
    with pytest.raises(ValueError, match="static cache is full.*build it with a larger max_len"):
        step(model, torch.randint(0, V, (1, 1)), cache)
    cache.reset()
    assert cache.length == 0


def test_generate_checks_the_static_cache_capacity_once_before_decoding(monkeypatch):
    """generate() knows the prompt length and the steps: a cache too small for them fails before
    the first forward, not after prefill and some steps."""
    from x_transformers import AutoregressiveWrapper

    ar = AutoregressiveWrapper(net())
    real = AutoregressiveWrapper._static_cache
    monkeypatch.setattr(AutoregressiveWrapper, "_static_cache", lambda self, b, n: real(self, b, n - 2))  # one slot is spare
    calls = []
    ar.net.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="build it with a larger max_len"):
        ar.generate(torch.randint(0, V, (2, 4)), 6, temperature=0.0, static_cache=True)
    assert not calls


def test_a_decode_step_compiled_by_the_caller_past_max_len_raises():
    """A step compiled outside generate() (gpt-fast style) has no host counter around it: a
    device-side assert in the graph stops the out-of-range write, again without a sync."""
    model = net(seed=4)
    cache = StaticKVCache.for_model(model, 1, 5)
    prefill(model, torch.randint(0, V, (1, 4)), None, cache)
    step = torch.compile(decode_step, backend="aot_eager", fullgraph=True)
    step(model, torch.randint(0, V, (1, 1)), cache)
    with pytest.raises(RuntimeError, match="static cache is full.*build it with a larger max_len"):
        step(model, torch.randint(0, V, (1, 1)), cache)


def test_an_unpadded_cache_gives_attention_no_mask_and_the_same_logits():
    """Issue 22 (decode speed): tokens that came without a mask leave the key mask out of attention
    (no per-layer mask work in a decode step); a padded prompt, or a mask set from outside, keeps it."""
    model = net()
    x = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        full = model(x)
        cache = KVCache()
        model(x[:, :4], cache=cache)
        assert cache.unpadded and cache.keys_and_mask(None, torch.tensor([[4]]))[1] is None
        steps = [model(x[:, i:i + 1], cache=cache)[:, -1] for i in (4, 5)]
        torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5)
        assert torch.equal(cache.next_positions(), torch.full((2, 1), 6))

        padded = KVCache()
        mask = torch.tensor([[True] * 4, [False, True, True, True]])
        model(x[:, :4], mask=mask, cache=padded)
        assert not padded.unpadded
        key_mask = padded.keys_and_mask(None, torch.tensor([[4]]))[1]
        assert key_mask is not None and not key_mask[1, 0, 0, 0]
        assert torch.equal(padded.next_positions(), torch.tensor([[4], [3]]))  # the padded row counts 3 tokens

    outside = KVCache()
    outside.key_mask, outside.positions = torch.tensor([[False, True]]), torch.tensor([[0, 0]])
    assert not outside.unpadded and outside.copy().unpadded is False


def test_decoding_reuses_the_fused_qkv_weight_until_a_weight_changes():
    """Without autograd the concatenated q/k/v weight is built once, not every decode step; an
    in-place update (an optimizer step) or a dtype change rebuilds it, so outputs follow the weights."""
    model = net()
    attn = next(m for m in model.modules() if hasattr(m, "_qkv_weight"))
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        w1, _ = attn._qkv_weight()
        assert attn._qkv_weight()[0] is w1
        attn.to_k.weight.add_(1.0)  # in place: the version counter moves
        w2, _ = attn._qkv_weight()
        nq, nk = attn.to_q.out_features, attn.to_k.out_features
        assert w2 is not w1 and torch.equal(w2[nq:nq + nk], attn.to_k.weight)
        q, k, v = attn._fused_qkv(x)
        torch.testing.assert_close(k, x @ attn.to_k.weight.T)
    assert attn._qkv_weight()[0] is not w2 and attn._qkv_memo is None  # with autograd: built per call, not kept
