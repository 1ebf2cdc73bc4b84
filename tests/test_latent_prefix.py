"""Prepended embeddings through the key/value cache (``AutoregressiveWrapper.generate(prepend_embeds=)``,
the core piece the latent wrappers decode with): cached decoding reads the prefix from the cache
and equals decoding without a cache, which re-reads the prefix every step, token for token, for
learned or rotary positions, memory tokens, ragged prompts, a static cache and beams."""

from __future__ import annotations

import pytest
import torch

from x_transformers import AutoregressiveWrapper, Decoder, KVCache, TransformerWrapper
from x_transformers.latent_prefix import generate_with_prefix

V = 24


def lm(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    layers = dict(dim=32, depth=2, heads=2) | kw.pop("layers", {})
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(**layers), **kw).eval()


CASES = {"learned positions": {}, "rotary": dict(layers=dict(rotary_pos_emb=True)),
         "memory tokens": dict(num_memory_tokens=2), "alibi": dict(layers=dict(alibi_pos_bias=True))}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_cached_prefix_decoding_equals_uncached(case):
    net = lm(**CASES[case])
    ar = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (3, 5))
    prefix = torch.randn(3, 2, 32)
    cached = ar.generate(prompts, 6, temperature=0.0, prepend_embeds=prefix)
    uncached = ar.generate(prompts, 6, temperature=0.0, prepend_embeds=prefix, cache_kv=False)
    assert torch.equal(cached, uncached)
    # and both are the model read with its prefix, step by step, by hand
    seq = prompts
    for _ in range(6):
        nxt = net(seq, prepend_embeds=prefix)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat((seq, nxt), dim=1)
    assert torch.equal(cached, seq[:, 5:])
    # the prefix matters
    assert (net(prompts, prepend_embeds=prefix) - net(prompts, prepend_embeds=-prefix)).abs().max() > 1e-3


def test_logits_through_the_cache_match_the_full_forward():
    net = lm()
    x = torch.randint(0, V, (2, 7))
    prefix = torch.randn(2, 3, 32)
    full = net(x, prepend_embeds=prefix, excise_prepend_embeds=True)
    cache = KVCache()
    first = net(x[:, :4], prepend_embeds=prefix, cache=cache, excise_prepend_embeds=True)
    assert cache.prefix_len == 3
    rest = [net(x[:, i:i + 1], cache=cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_ragged_prompts_static_cache_and_beams_with_a_prefix():
    net = lm(layers=dict(rotary_pos_emb=True))
    ar = AutoregressiveWrapper(net)
    prompts = [torch.randint(0, V, (n,)) for n in (3, 6)]
    prefix = torch.randn(2, 2, 32)
    alone = [ar.generate(p[None], 4, temperature=0.0, prepend_embeds=prefix[i:i + 1]) for i, p in enumerate(prompts)]
    together = ar.generate(prompts, 4, temperature=0.0, prepend_embeds=prefix)
    assert torch.equal(together, torch.cat(alone))
    static = ar.generate(prompts, 4, temperature=0.0, prepend_embeds=prefix, static_cache=True)
    assert torch.equal(static, together)
    compiled = ar.generate(prompts, 4, temperature=0.0, prepend_embeds=prefix, compile={"backend": "eager"})
    assert torch.equal(compiled, together)
    beams = ar.generate(prompts, 4, beams=3, prepend_embeds=prefix)
    beams_uncached = ar.generate(prompts, 4, beams=3, prepend_embeds=prefix, cache_kv=False)
    assert torch.equal(beams, beams_uncached)


def test_prefix_refusals_are_one_line():
    net = lm()
    ar = AutoregressiveWrapper(net)
    prompts = torch.randint(0, V, (2, 4))
    with pytest.raises(ValueError, match="prepend_embeds must be"):
        ar.generate(prompts, 2, prepend_embeds=torch.randn(2, 1, 31))
    with pytest.raises(ValueError, match="restrict_to_max_seq_len"):
        ar.generate(prompts, 40, prepend_embeds=torch.randn(2, 1, 32), restrict_to_max_seq_len=True)
    cache = KVCache()
    net(prompts, cache=cache)
    with pytest.raises(ValueError, match="prepend_embeds with cache"):
        net(prompts[:, :1], cache=cache, prepend_embeds=torch.randn(2, 1, 32))
    with pytest.raises(TypeError, match="latents"):
        generate_with_prefix(net, prompts, 2, torch.randn(2, 1, 32), prepend_embeds=torch.randn(2, 1, 32))


def _harness_decoder_features():
    import harness

    return {name: f for name, f in sorted(harness.load_features().items())
            if "decoder" in f.kinds and f.cacheable and name != "ff_deep_embed"}  # ff_deep_embed refuses prefixes


@pytest.mark.parametrize("name", list(_harness_decoder_features()))
def test_every_cacheable_feature_decodes_a_prefix_through_the_cache(name):
    """The harness's cache property with a prefix: a left-padded prefill that holds prepended
    embeddings (some masked out by a prepend_mask: keys nobody attends to), then one token at a time,
    gives the full forward's logits (dynamic and static cache)."""
    import harness
    from x_transformers import StaticKVCache

    feature = _harness_decoder_features()[name]
    net = harness.build("decoder", [feature])
    x = harness.tokens(n=8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :2] = False
    prefix = torch.randn(2, 3, net.emb_dim, generator=torch.Generator().manual_seed(3))
    pmask = torch.tensor([[True, False, True], [False, True, True]])
    ahead = dict(prepend_embeds=prefix, prepend_mask=pmask, excise_prepend_embeds=True)
    ref = net(x, keep, **ahead)
    tol = max(feature.tol, 1e-5)
    for make in (KVCache, lambda: StaticKVCache.for_model(net, 2, net.num_memory_tokens + 11)):
        cache = make()
        outs = [net(x[:, :3], keep[:, :3], cache=cache, **ahead)]
        outs += [net(x[:, t:t + 1], cache=cache) for t in range(3, 8)]
        torch.testing.assert_close(torch.cat(outs, 1)[keep], ref[keep], atol=tol, rtol=tol)


def test_a_masked_prefix_decodes_through_either_cache_as_without_one():
    """generate(prepend_embeds=, prepend_mask=) (upstream's): the masked prefix columns are keys
    nobody attends to, so a row decodes as with those columns dropped (their values do not matter),
    and cached decoding (dynamic or static cache, a left-padded ragged prompt, beams) equals
    uncached decoding token for token."""
    net = lm(layers=dict(rotary_pos_emb=True), seed=1)
    ar = AutoregressiveWrapper(net)
    prompts = [torch.randint(0, V, (n,)) for n in (5, 2)]  # row 1 is left-padded
    prefix = torch.randn(2, 3, 32)
    pmask = torch.tensor([[True, False, True], [False, False, True]])
    ahead = dict(prepend_embeds=prefix, prepend_mask=pmask)
    uncached = ar.generate(prompts, 6, temperature=0.0, cache_kv=False, **ahead)
    for extra in ({}, dict(static_cache=True)):
        assert torch.equal(ar.generate(prompts, 6, temperature=0.0, **ahead, **extra), uncached)
    assert torch.equal(ar.generate(prompts, 4, beams=2, **ahead),
                       ar.generate(prompts, 4, beams=2, cache_kv=False, **ahead))
    # each row is its prompt read after only its kept prefix columns
    for i, p in enumerate(prompts):
        alone = ar.generate(p[None], 6, temperature=0.0, prepend_embeds=prefix[i:i + 1, pmask[i]])
        assert torch.equal(alone, uncached[i:i + 1])
    # the masked columns' values are never read
    noise = torch.where(pmask[..., None], prefix, torch.randn_like(prefix) * 100)
    assert torch.equal(ar.generate(prompts, 6, temperature=0.0, prepend_embeds=noise, prepend_mask=pmask), uncached)
    # and the mask matters
    assert (net(torch.stack([p[:2] for p in prompts]), **ahead)
            - net(torch.stack([p[:2] for p in prompts]), prepend_embeds=prefix)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="prepend_mask without prepend_embeds"):
        ar.generate(prompts, 2, prepend_mask=pmask)
