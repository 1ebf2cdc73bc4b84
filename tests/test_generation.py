"""AutoregressiveWrapper: loss, ragged prompts, eos, beams, cache parity, seeded sampling;
XTransformer.generate."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper, XTransformer

V = 23
SCHEMES = {
    "learned_abs": dict(),
    "sinusoidal": dict(wrapper=dict(sinusoidal_pos_emb=True)),
    "rotary": dict(layers=dict(rotary_pos_emb=True)),
    "alibi": dict(layers=dict(alibi_pos_bias=True)),
    "t5": dict(layers=dict(rel_pos_bias=True)),
    "memory_tokens+mem_kv": dict(wrapper=dict(num_memory_tokens=2), layers=dict(attn_num_mem_kv=2)),
}


def model(scheme="learned_abs", seed=0, **extra):
    torch.manual_seed(seed)
    cfg = SCHEMES[scheme]
    net = TransformerWrapper(num_tokens=V, max_seq_len=32, **cfg.get("wrapper", {}),
                             attn_layers=Decoder(dim=32, depth=2, heads=4, **cfg.get("layers", {}), **extra))
    return AutoregressiveWrapper(net.eval())


def prompts(lengths=(5, 2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def test_loss_is_shifted_cross_entropy_honouring_ignore_index_and_mask():
    ar = model()
    x = torch.randint(0, V, (2, 9))
    logits = ar.net(x[:, :-1])
    ref = F.cross_entropy(logits.transpose(1, 2), x[:, 1:])
    torch.testing.assert_close(ar(x), ref)
    y = x.clone()
    y[0, 5] = -100  # an ignored target: neither predicted nor fed as a token id
    inp = x[:, :-1].clone()
    inp[0, 5] = 0
    logits = ar.net(inp)
    tgt = y[:, 1:]
    per_tok = F.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")
    keep = tgt != -100
    torch.testing.assert_close(ar(y), per_tok[keep].mean())
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 7:] = False
    logits = ar.net(x[:, :-1], mask[:, :-1])
    per_tok = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    torch.testing.assert_close(ar(x, mask), per_tok[mask[:, 1:]].mean())
    ar(x).backward()
    assert ar.net.token_emb.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_ragged_prompts_generate_what_each_row_generates_alone(scheme):
    ar = model(scheme)
    ps = prompts()
    for static in (False, True):
        batch = ar.generate(ps, 6, temperature=0.0, static_cache=static)
        for i, p in enumerate(ps):
            alone = ar.generate(p[None], 6, temperature=0.0)
            assert torch.equal(batch[i], alone[0]), f"row {i} (static={static}) differs from its solo run"
    uncached = ar.generate(ps, 6, temperature=0.0, cache_kv=False)
    assert torch.equal(uncached, ar.generate(ps, 6, temperature=0.0))


def test_eos_stops_rows_and_pads():
    ar = model("rotary")
    ps = prompts()
    free = ar.generate(ps, 8, temperature=0.0)
    eos = int(free[0, 2])  # row 0 emits this at step 2 (maybe earlier)
    out = ar.generate(ps, 8, temperature=0.0, eos_token=eos)
    for i in range(len(ps)):
        hits = (free[i] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 8
        assert torch.equal(out[i, :stop], free[i, :stop])
        assert (out[i, stop:] == ar.pad_value).all()
    assert (out[0, 3:] == ar.pad_value).all()


def sequence_score(ar, prompt, new, eos=None, length_penalty=1.0):
    """Mean (length-normalised) log-probability of ``new`` after ``prompt``, by a full forward."""
    if eos is not None and (new == eos).any():
        new = new[: int((new == eos).nonzero()[0]) + 1]
    seq = torch.cat((prompt, new))[None]
    logp = ar.net(seq[:, :-1]).log_softmax(-1)[0, len(prompt) - 1:]
    return logp.gather(-1, new[:, None]).sum() / len(new) ** length_penalty


def test_beam_search():
    ar = model("rotary", seed=3)
    ps = torch.stack(prompts((4, 4), seed=1))
    greedy, g_scores = ar.generate(ps, 6, temperature=0.0, return_scores=True)
    one, one_scores = ar.generate(ps, 6, beams=1, return_scores=True)
    assert torch.equal(one, greedy)
    torch.testing.assert_close(one_scores, g_scores)
    for eos in (None, int(greedy[0, 3])):
        greedy, g_scores = ar.generate(ps, 6, temperature=0.0, eos_token=eos, return_scores=True)
        beam, b_scores = ar.generate(ps, 6, beams=4, eos_token=eos, return_scores=True)
        assert (b_scores >= g_scores - 1e-6).all(), "beam search scored below greedy"
        for i in range(ps.shape[0]):  # the returned score is the sequence's real normalised score
            torch.testing.assert_close(b_scores[i], sequence_score(ar, ps[i], beam[i], eos), atol=1e-5, rtol=1e-5)
        for static in (False, True):
            assert torch.equal(ar.generate(ps, 6, beams=4, eos_token=eos, static_cache=static), beam)
        assert torch.equal(ar.generate(ps, 6, beams=4, eos_token=eos, cache_kv=False), beam)


def test_seeded_sampling_reproducible_across_caches():
    ar = model("alibi")
    ps = prompts()

    def run(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return ar.generate(ps, 8, temperature=1.0, filter_logits_fn="top_p", filter_kwargs=dict(p=0.9),
                           generator=g, **kw)

    a = run(0)
    assert torch.equal(a, run(0))
    assert torch.equal(a, run(0, static_cache=True))
    assert torch.equal(a, run(0, cache_kv=False))
    assert not torch.equal(a, run(1))


def test_compiled_static_decode_matches_eager():
    torch._dynamo.reset()
    ar = model("rotary")
    ps = prompts()
    eager = ar.generate(ps, 5, temperature=0.0)
    assert torch.equal(ar.generate(ps, 5, temperature=0.0, compile=dict(backend="aot_eager")), eager)


def test_encoder_cannot_be_wrapped():
    net = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Encoder(dim=32, depth=1, heads=4))
    with pytest.raises(ValueError, match="causal"):
        AutoregressiveWrapper(net)


def xtransformer():
    torch.manual_seed(0)
    return XTransformer(dim=32, depth=2, heads=4, num_tokens=V, max_seq_len=32, dec_rotary_pos_emb=True,
                        dec_attn_kv_heads=2).eval()


def test_xtransformer_generate_equals_uncached_greedy():
    model = xtransformer()
    src = torch.randint(1, V, (2, 9))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False
    start = torch.ones(2, 1, dtype=torch.long)
    tgt = start
    for _ in range(7):  # the reference: re-encode and run the whole target every step
        nxt = model(src, tgt, mask=src_mask)[:, -1].argmax(-1, keepdim=True)
        tgt = torch.cat((tgt, nxt), dim=1)
    for kw in (dict(), dict(static_cache=True)):
        out = model.generate(src, start, 7, mask=src_mask, temperature=0.0, **kw)
        assert torch.equal(out, tgt[:, 1:])
    beam = model.generate(src, start, 7, mask=src_mask, beams=3)
    assert torch.equal(beam, model.generate(src, start, 7, mask=src_mask, beams=3, cache_kv=False))


# --------------------------------------------------------------------------------------------------
# issue 16: generate's keywords become one validated frozen GenerationConfig, checked before any work

NAN, INF = float("nan"), float("inf")
BAD_KEYWORDS = {  # keywords -> (error type, what the one-line message must say)
    "temperature_nan": (dict(temperature=NAN), ValueError, "temperature must be a finite number >= 0"),
    "temperature_inf": (dict(temperature=INF), ValueError, "temperature must be a finite number >= 0"),
    "temperature_negative": (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
    "eos_past_vocab": (dict(eos_token=V), ValueError, rf"eos_token must be a token id in \[0, {V}\)"),
    "eos_negative": (dict(eos_token=-1), ValueError, rf"eos_token must be a token id in \[0, {V}\)"),
    "length_penalty_nan": (dict(length_penalty=NAN), ValueError, "length_penalty must be a finite number"),
    "length_penalty_inf": (dict(length_penalty=-INF), ValueError, "length_penalty must be a finite number"),
    "beams_zero": (dict(beams=0), ValueError, "beams must be a positive integer"),
    "beams_float": (dict(beams=2.0), ValueError, "beams must be a positive integer"),
    "seq_len_zero": (dict(seq_len=0), ValueError, "seq_len must be a positive integer"),
    "seq_len_bool": (dict(seq_len=True), ValueError, "seq_len must be a positive integer"),
    "filter_kwarg_typo": (dict(filter_logits_fn="top_k", filter_kwargs=dict(kk=3)), TypeError,
                          "top_k takes no keyword 'kk'; did you mean 'k'"),
    "filter_kwarg_of_another_filter": (dict(filter_logits_fn="min_p", filter_kwargs=dict(k=3)), TypeError,
                                       r"min_p takes no keyword 'k'.*valid: \['min_p', 'p'\]"),
    "filter_kwargs_without_filter": (dict(filter_kwargs=dict(k=3)), TypeError, "without a filter_logits_fn"),
    "unknown_filter": (dict(filter_logits_fn="topk"), ValueError, r"did you mean 'top_k'.*valid: \["),
    "compile_without_static_cache": (dict(compile=True, static_cache=False), ValueError, "needs static_cache=True"),
    "static_cache_without_cache": (dict(static_cache=True, cache_kv=False), ValueError, "need cache_kv=True"),
}


@pytest.mark.parametrize("case", list(BAD_KEYWORDS))
def test_generate_rejects_bad_keywords_in_one_line_before_any_work(case):
    keywords, error, message = BAD_KEYWORDS[case]
    keywords = dict(seq_len=4) | keywords
    ar = model()
    calls = []
    ar.net.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(error, match=message) as info:
        ar.generate(torch.randint(0, V, (2, 3)), **keywords)
    assert "\n" not in str(info.value)
    assert not calls, "the model ran before the keywords were checked"


def test_generation_config_is_frozen_and_resolves_static_cache():
    from dataclasses import FrozenInstanceError

    from x_transformers.autoregressive import GenerationConfig

    cfg = GenerationConfig(seq_len=4, num_tokens=V, compile=dict(backend="eager"),
                           filter_logits_fn="top_k", filter_kwargs=dict(k=2))
    assert cfg.static_cache is True  # on when compiling
    assert GenerationConfig(seq_len=4, num_tokens=V).static_cache is False
    with pytest.raises(FrozenInstanceError):
        cfg.temperature = 0.0
    with pytest.raises(TypeError):
        cfg.filter_kwargs["k"] = 3  # read-only: the config cannot change under the decoding loop
    with pytest.raises(TypeError):
        GenerationConfig(4, V)  # keyword-only, like generate's own keywords


def test_decoding_helpers_receive_the_config_by_name(monkeypatch):
    from x_transformers.autoregressive import GenerationConfig

    ar, seen = model(), []
    real = AutoregressiveWrapper._stepper

    def spy(self, tokens, mask, cfg, **inputs):
        seen.append((cfg, sorted(inputs)))
        return real(self, tokens, mask, cfg, **inputs)

    monkeypatch.setattr(AutoregressiveWrapper, "_stepper", spy)
    ar.generate(torch.randint(0, V, (2, 3)), 3, temperature=0.0)
    ar.generate(torch.randint(0, V, (2, 3)), 3, beams=2, eos_token=1)
    assert [type(c) for c, _ in seen] == [GenerationConfig] * 2
    assert seen[1][0].beams == 2 and seen[1][0].eos_token == 1
    # the stack's inputs, by name (prepend: prepend_embeds, read by the prefill)
    assert all(names == ["condition", "context", "context_mask", "prepend"] for _, names in seen)


@pytest.mark.parametrize("prompts, message", [
    (torch.zeros(0, 3, dtype=torch.long), r"prompts has an empty batch \(shape \(0, 3\)\); pass at least one row"),
    (torch.zeros(2, 0, dtype=torch.long), "prompts has zero-length sequences"),
    ([], "prompts is an empty list; pass at least one prompt"),
    ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], r"prompts\[1\] must be a non-empty 1-D token tensor"),
])
def test_generate_rejects_empty_prompts_naming_the_argument(prompts, message):
    ar = model()
    calls = []
    ar.net.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=message):
        ar.generate(prompts, 3)
    assert not calls


def test_generate_rejects_a_context_of_the_wrong_batch_or_width_before_any_work():
    xt = XTransformer(dim=32, depth=1, heads=4, num_tokens=V, max_seq_len=16).eval()
    ar = AutoregressiveWrapper(xt.decoder)
    start = torch.zeros(2, 1, dtype=torch.long)
    calls = []
    ar.net.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="context has batch 3 but the input has 2; pass one context row per input"):
        ar.generate(start, 3, context=torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="context has width 16 but cross-attention expects 32"):
        ar.generate(start, 3, context=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="context contains NaN"):
        ar.generate(start, 3, context=torch.randn(2, 5, 32).index_fill(1, torch.tensor([2]), float("nan")))
    with pytest.raises(ValueError, match=r"context_mask must be a bool tensor of shape \(2, 5\)"):
        ar.generate(start, 3, context=torch.randn(2, 5, 32), context_mask=torch.ones(2, 4, dtype=torch.bool))
    assert not calls
