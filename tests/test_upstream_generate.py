"""Upstream x-transformers' forward and generation API on this package (issue #17 part C):
``return_intermediates`` / ``cache=`` incremental decoding, ``seq_start_pos``, ``pos``,
``self_attn_kv_mask``, upstream's filter keyword names (kept sets compared with the real upstream
package in a child process), ``generate``'s upstream keywords, ``beam_search`` against a
brute-force enumeration, and ``mask_prob``."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from upstream import required_path

from x_transformers import AutoregressiveWrapper, Decoder, Encoder, TransformerWrapper
from x_transformers.cache import Intermediates
from x_transformers.sampling import FILTERS

V = 23
SCHEMES = {
    "learned_abs": (dict(), dict()),
    "rotary": (dict(), dict(rotary_pos_emb=True)),
    "alibi": (dict(), dict(alibi_pos_bias=True)),
    "memory_tokens": (dict(num_memory_tokens=2), dict()),
}


def net(scheme="learned_abs", seed=0, num_tokens=V, max_seq_len=32, **layers):
    torch.manual_seed(seed)
    wrapper, stack = SCHEMES[scheme]
    return TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len, **wrapper,
                              attn_layers=Decoder(dim=32, depth=2, heads=4, **stack, **layers)).eval()


def tokens(b=2, n=10, seed=1, v=V):
    return torch.randint(0, v, (b, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# TransformerWrapper.forward


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("include_past", [True, False])
def test_decoding_through_intermediates_equals_the_full_forward(scheme, include_past):
    model, x = net(scheme), tokens()
    full = model(x)
    logits, inter = model(x[:, :3], return_intermediates=True)
    assert isinstance(inter, Intermediates) and inter.cache_length == 3
    steps = [logits]
    for i in range(3, x.shape[1]):
        inp = x[:, :i + 1] if include_past else x[:, i:i + 1]
        logits, inter = model(inp, cache=inter, return_intermediates=True, input_not_include_cache=not include_past)
        steps.append(logits)
    assert inter.cache_length == x.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_cross_attention_cache_through_intermediates():
    model = net(cross_attend=True)
    x, ctx = tokens(), torch.randn(2, 5, 32)
    full = model(x, context=ctx)
    _, inter = model(x[:, :-1], context=ctx, return_intermediates=True)
    torch.testing.assert_close(model(x, context=ctx, cache=inter)[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_an_intermediates_passed_as_cache_is_left_as_it_was():
    """Upstream's calls are functional: two continuations of one cache do not see each other."""
    model, x = net("rotary"), tokens()
    _, inter = model(x[:, :5], return_intermediates=True)
    a = model(x[:, :6], cache=inter)
    y = x[:, :6].clone()
    y[:, 5] = (y[:, 5] + 1) % V
    b = model(y, cache=inter)  # a different continuation of the same cache
    torch.testing.assert_close(a, model(x[:, :6])[:, -1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, model(y)[:, -1:], atol=1e-5, rtol=1e-4)
    assert inter.cache_length == 5 and inter.cache.seq_len == 5


@pytest.mark.parametrize("scheme", ["learned_abs", "rotary", "memory_tokens"])
def test_seq_start_pos_is_left_padding_parallel_and_incremental(scheme):
    model, x = net(scheme), tokens()
    start = torch.tensor([5, 0])
    parallel = model(x, seq_start_pos=start)
    inter, steps = None, []
    for i in range(x.shape[1]):
        out = model(x[:, i:i + 1], seq_start_pos=start, cache=inter, return_intermediates=True,
                    input_not_include_cache=inter is not None)
        logits, inter = out
        steps.append(logits)
    kept = torch.arange(x.shape[1]) >= start[:, None]
    torch.testing.assert_close(torch.cat(steps, dim=1)[kept], parallel[kept], atol=1e-5, rtol=1e-4)
    # each row's real tokens compute what they compute alone (padding moves no position)
    torch.testing.assert_close(parallel[0, 5:], model(x[:1, 5:])[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parallel[1], model(x[1:])[0], atol=1e-5, rtol=1e-4)


def test_custom_positions():
    x = tokens()
    model = net("rotary")  # relative: shifting every position by a constant changes nothing
    torch.testing.assert_close(model(x, pos=torch.arange(10) + 7), model(x), atol=1e-5, rtol=1e-4)
    model = net("learned_abs")
    same = model(x, pos=torch.arange(10)[None].expand(2, -1))
    torch.testing.assert_close(same, model(x))
    shifted = model(x, pos=torch.arange(10) + 3)
    assert not torch.allclose(shifted, model(x), atol=1e-3)
    # a float pos is the absolute embedding itself, added in place of the learned one
    external = model.pos_emb(torch.arange(10) + 3)[None]
    torch.testing.assert_close(model(x, pos=external), shifted)


def test_self_attn_kv_mask_hides_keys_without_moving_positions():
    model, x = net("learned_abs"), tokens()
    kv = torch.ones(2, 10, dtype=torch.bool)
    kv[:, 4] = False
    y = x.clone()
    y[:, 4] = (y[:, 4] + 5) % V
    a, b = model(x, self_attn_kv_mask=kv), model(y, self_attn_kv_mask=kv)
    others = torch.arange(10) != 4
    torch.testing.assert_close(a[:, others], b[:, others])  # nobody else reads column 4
    torch.testing.assert_close(a[:, :4], model(x)[:, :4])  # earlier columns: positions unchanged
    assert not torch.allclose(model(x)[:, 5:], model(y)[:, 5:], atol=1e-4)  # without the mask they differ


def test_return_forms():
    model, x = net(), tokens()
    logits = model(x)
    hidden = model(x, return_embeddings=True)
    lg, hd = model(x, return_logits_and_embeddings=True)
    torch.testing.assert_close(lg, logits)
    torch.testing.assert_close(hd, hidden)
    hd, inter = model(x, return_embeddings_and_intermediates=True)
    torch.testing.assert_close(hd, hidden)
    torch.testing.assert_close(inter.last_hidden, hidden)
    _, inter = model(x, return_logit_entropies=True)
    p = logits.softmax(-1)
    torch.testing.assert_close(inter.logit_entropies, -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)


def test_bidirectional_intermediates_hold_no_cache_and_say_so():
    model = TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Encoder(dim=32, depth=1, heads=4))
    _, inter = model(tokens(), return_intermediates=True)
    assert inter.cache is None
    with pytest.raises(ValueError, match="holds no key/value cache"):
        model(tokens(), cache=inter)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(mems=[]), ValueError, "mems must be a list of 2 tensors"),
    (dict(recycle_steps=2), ValueError, "recycle_steps= needs a wrapper built with recycling=True"),
    (dict(transform_token_embeds=None), TypeError, "'transform_token_embeds' is not supported"),
    (dict(attn_mask=torch.ones(2, 10, 10, dtype=torch.bool)), TypeError, "'attn_mask' is not supported"),
    (dict(looped_steps=2), ValueError, "looped_steps= needs a wrapper built with looped=True"),
    (dict(nonsense=1), TypeError, "unexpected keyword 'nonsense'"),
    (dict(causal=False, cache=__import__("x_transformers").KVCache()), ValueError, "causal=False at forward"),
    (dict(seq_start_pos=torch.tensor([1.0, 0.0])), ValueError, "seq_start_pos must be an integer tensor"),
    (dict(input_not_include_cache=True), ValueError, "input_not_include_cache=True needs cache="),
])
def test_forward_refuses_what_it_cannot_honour_naming_the_keyword(kwargs, error, message):
    with pytest.raises(error, match=message):
        net()(tokens(), **kwargs)
    net()(tokens(), causal=True)  # the stack's own value is fine


def test_cache_needs_more_tokens_than_it_holds():
    model, x = net(), tokens()
    _, inter = model(x[:, :5], return_intermediates=True)
    with pytest.raises(ValueError, match="cache= holds 5 tokens"):
        model(x[:, :5], cache=inter)


# ---------------------------------------------------------------------------------------------
# filters: upstream's keyword names keep the same sets as upstream's own functions

FILTER_CASES = [
    ("top_k", {}), ("top_k", {"frac_num_tokens": 0.25}), ("top_k", {"k": 5}), ("top_k", {"frac_num_tokens": 0.03}),
    ("top_p", {}), ("top_p", {"thres": 0.5}), ("top_p", {"thres": 0.99}),
    ("min_p", {}), ("min_p", {"min_p": 0.05}), ("min_p", {"min_p": 0.5}),
    ("top_a", {}), ("top_a", {"min_p_ratio": 0.5}), ("top_a", {"min_p_pow": 1.0, "min_p_ratio": 0.3}),
]


def fixed_logits():
    g = torch.Generator().manual_seed(3)
    return torch.randn(6, 97, generator=g) * torch.tensor([0.5, 1.0, 2.0, 3.0, 5.0, 8.0])[:, None]


def upstream_kept_sets():
    script = (
        "import json, sys, torch\n"
        "from x_transformers.autoregressive_wrapper import FILTER_LOGITS_FN\n"
        "cases, logits = json.loads(sys.stdin.read())\n"
        "logits = torch.tensor(logits)\n"
        "print(json.dumps([torch.isfinite(FILTER_LOGITS_FN[n](logits.clone(), **kw)).tolist() for n, kw in cases]))\n")
    env = dict(os.environ, PYTHONPATH=str(required_path()))
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([FILTER_CASES, fixed_logits().tolist()]),
                          capture_output=True, text=True, cwd="/tmp", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_filters_keep_the_same_sets_as_upstream_under_upstream_keyword_names():
    theirs = upstream_kept_sets()
    logits = fixed_logits()
    for (name, kwargs), kept in zip(FILTER_CASES, theirs):
        ours = torch.isfinite(FILTERS[name](logits, **kwargs))
        assert ours.tolist() == kept, (name, kwargs, ours.sum(-1).tolist(), torch.tensor(kept).sum(-1).tolist())
        assert ours.sum() < ours.numel() or name == "top_p"  # each case drops something (it tests a cut)


def test_filters_keep_exactly_the_documented_sets():
    logits = fixed_logits()
    probs = logits.softmax(-1)
    kept = torch.isfinite(FILTERS["top_k"](logits, frac_num_tokens=0.25))
    assert (kept.sum(-1) == 25).all()  # ceil(0.25 * 97)
    assert (logits.masked_fill(~kept, float("inf")).amin(-1) >= logits.masked_fill(kept, -float("inf")).amax(-1)).all()
    kept = torch.isfinite(FILTERS["min_p"](logits, min_p=0.2))
    assert torch.equal(kept, probs >= 0.2 * probs.amax(-1, keepdim=True))
    kept = torch.isfinite(FILTERS["top_a"](logits, min_p_pow=2.0, min_p_ratio=0.5))
    assert torch.equal(kept, probs >= 0.5 * probs.amax(-1, keepdim=True) ** 2)
    kept = torch.isfinite(FILTERS["top_p"](logits, thres=0.7))
    for row in range(len(logits)):  # the smallest most-likely set reaching 0.7
        mass = probs[row][kept[row]].sum()
        assert mass >= 0.7 and mass - probs[row][kept[row]].min() < 0.7
    with pytest.raises(TypeError, match="pass p= or thres="):
        FILTERS["top_p"](logits, p=0.5, thres=0.5)


# ---------------------------------------------------------------------------------------------
# generate


def greedy_by_hand(model, x, n, window=None):
    seq = x
    for _ in range(n):
        inp = seq if window is None else seq[:, -window:]
        seq = torch.cat((seq, model(inp)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq[:, x.shape[1]:]


def test_generate_in_upstream_positional_order_equals_our_keywords():
    ar = AutoregressiveWrapper(net("rotary"))
    x = tokens(n=4)
    ours = ar.generate(x, 6, temperature=0.0, eos_token=None)
    theirs = ar.generate(x, 6, None, 0.0)  # prompts, seq_len, eos_token, temperature
    assert torch.equal(ours, theirs) and torch.equal(ours, greedy_by_hand(ar.net, x, 6))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = ar.generate(x, 6, None, 1.0, None, "top_k", False, None, dict(frac_num_tokens=0.2), generator=g())
    b = ar.generate(x, 6, temperature=1.0, filter_logits_fn="top_k", filter_kwargs=dict(k=5), generator=g())
    assert torch.equal(a, b)  # ceil(0.2 * 23) = 5


def test_prompt_lens_and_one_dimensional_prompts():
    ar = AutoregressiveWrapper(net("learned_abs"))
    rows = [tokens(1, 5, seed=2)[0], tokens(1, 3, seed=3)[0]]
    padded = torch.zeros(2, 5, dtype=torch.long)
    padded[0], padded[1, :3] = rows[0], rows[1]
    from_list = ar.generate(rows, 5, temperature=0.0)
    from_lens = ar.generate(padded, 5, temperature=0.0, prompt_lens=torch.tensor([5, 3]))
    assert torch.equal(from_list, from_lens)
    single = ar.generate(rows[1], 5, temperature=0.0)
    assert single.shape == (5,) and torch.equal(single, from_list[1])


def test_return_intermediates_continues_decoding():
    ar = AutoregressiveWrapper(net("rotary"))
    x = tokens(n=4)
    out, inter = ar.generate(x, 5, temperature=0.0, return_intermediates=True)
    assert inter.cache_length == 4 + 5 - 1  # the last token is not run yet, as upstream
    seq = torch.cat((x, out), dim=1)
    torch.testing.assert_close(ar.net(seq, cache=inter)[:, -1], ar.net(seq)[:, -1], atol=1e-5, rtol=1e-4)


def test_restrict_to_max_seq_len_is_a_sliding_window():
    ar = AutoregressiveWrapper(net("rotary", max_seq_len=8))
    x = tokens(n=5)
    uncached = ar.generate(x, 9, temperature=0.0, cache_kv=False, restrict_to_max_seq_len=True)
    assert torch.equal(uncached, greedy_by_hand(ar.net, x, 9, window=8))
    out, inter = ar.generate(x, 9, temperature=0.0, restrict_to_max_seq_len=True, return_intermediates=True)
    assert inter.cache_length == 5 + 9 - 1 and inter.cache.seq_len == 8  # only the latest window is kept
    assert inter.cache.positions[0].tolist() == list(range(5 + 9 - 1 - 8, 5 + 9 - 1))  # positions go on
    full = ar.generate(x, 9, temperature=0.0)  # off: the whole context (rotary has no length cap)
    assert torch.equal(full, greedy_by_hand(ar.net, x, 9))
    abs_ar = AutoregressiveWrapper(net("learned_abs", max_seq_len=8))
    with pytest.raises(ValueError, match="learned absolute positions cannot slide with a cache"):
        abs_ar.generate(x, 9, restrict_to_max_seq_len=True)
    assert torch.equal(abs_ar.generate(x, 9, temperature=0.0, cache_kv=False, restrict_to_max_seq_len=True),
                       greedy_by_hand(abs_ar.net, x, 9, window=8))


def test_generate_refuses_upstream_keywords_it_cannot_honour():
    ar = AutoregressiveWrapper(net())
    with pytest.raises(TypeError, match="contrastive decoding"):
        ar.generate(tokens(n=3), 2, amateur_model=net())
    with pytest.raises(TypeError, match="generate got an unexpected keyword 'seq_for_latents'"):
        ar.generate(tokens(n=3), 2, seq_for_latents=1)


# ---------------------------------------------------------------------------------------------
# beam search


def test_beam_width_one_is_greedy():
    ar = AutoregressiveWrapper(net("rotary"))
    x = tokens(n=4)
    assert torch.equal(ar.beam_search(x, 7, beams=1), ar.generate(x, 7, temperature=0.0))


def total_logprob(model, prompt, cont):
    seq = torch.cat((prompt, cont))[None]
    logp = model(seq[:, :-1]).log_softmax(-1)[0, len(prompt) - 1:]
    return logp.gather(-1, cont[:, None]).sum().item()


@pytest.mark.parametrize("cache_kv", [True, False])
def test_beams_are_the_brute_force_top_sequences_by_total_log_probability(cache_kv):
    v, n = 4, 3
    model = net("rotary", num_tokens=v, seed=4)
    ar = AutoregressiveWrapper(model)
    x = tokens(b=2, n=3, v=v, seed=6)
    k = v ** (n - 1)  # wide enough to keep every prefix: the search is exact
    beams, scores = ar.beam_search(x, n, beams=k, return_beams_and_scores=True, cache_kv=cache_kv)
    assert beams.shape == (k, 2, n) and scores.shape == (k, 2)
    for row in range(2):
        every = {c: total_logprob(model, x[row], torch.tensor(c)) for c in itertools.product(range(v), repeat=n)}
        best = sorted(every, key=every.get, reverse=True)[:k]
        assert [tuple(b) for b in beams[:, row].tolist()] == best
        torch.testing.assert_close(scores[:, row], torch.tensor([every[c] for c in best]), atol=1e-4, rtol=1e-4)
    # a narrow beam's scores are still the total log-probabilities of what it returns, best first
    beams, scores = ar.beam_search(x, n, beams=2, return_beams_and_scores=True)
    for row, j in itertools.product(range(2), range(2)):
        assert abs(scores[j, row].item() - total_logprob(model, x[row], beams[j, row])) < 1e-4
    assert (scores[0] >= scores[1]).all()
    assert torch.equal(ar.generate(x, n, beams=2), beams[0])  # no eos: equal lengths, same best


def test_stochastic_beam_search_is_seeded_and_scored_by_log_probability():
    model = net("rotary")
    ar = AutoregressiveWrapper(model)
    x = tokens(b=1, n=3)
    run = lambda seed: ar.beam_search(x, 4, beams=3, stochastic=True, return_beams_and_scores=True,  # noqa: E731
                                      filter_logits_fn="top_k", filter_kwargs=dict(k=6),
                                      generator=torch.Generator().manual_seed(seed))
    (b1, s1), (b2, s2) = run(0), run(0)
    assert torch.equal(b1, b2) and torch.equal(s1, s2)
    for j in range(3):
        assert abs(s1[j, 0].item() - total_logprob(model, x[0], b1[j, 0])) < 1e-4


# ---------------------------------------------------------------------------------------------
# AutoregressiveWrapper: constructor keywords, mask_prob, forward keywords


def test_constructor_takes_upstream_keywords_at_their_defaults_and_refuses_the_rest():
    AutoregressiveWrapper(net(), ignore_index=-1, pad_value=3, mask_prob=0.15, add_attn_z_loss=False,
                          next_embed_loss_weight=0.1, looped_loss_threshold_exit=0.05, looped_loss_slope=50,
                          looped_exit_loss_weight=1.0)
    with pytest.raises(ValueError, match="looped_loss_slope configures the looped loss; this net is not looped"):
        AutoregressiveWrapper(net(), looped_loss_slope=5)
    with pytest.raises(ValueError, match="mask_prob must be a number in \\[0, 1\\)"):
        AutoregressiveWrapper(net(), mask_prob=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'mask_probability'"):
        AutoregressiveWrapper(net(), mask_probability=0.1)


def test_mask_prob_hides_exactly_its_share_of_keys_never_the_first():
    ar = AutoregressiveWrapper(net(), mask_prob=0.3)
    torch.manual_seed(0)
    x = torch.zeros(4000, 20, dtype=torch.long)
    keep = ar.kv_mask(x)
    assert ((~keep).sum(-1) == 6).all()  # int(20 * 0.3) per row
    assert keep[:, 0].all()
    rate = (~keep[:, 1:]).float().mean(0)  # uniform over the other 19 columns: 6 / 19 each
    assert (rate - 6 / 19).abs().max() < 0.03


def test_mask_prob_hidden_tokens_reach_no_other_position():
    ar = AutoregressiveWrapper(net(), mask_prob=0.3)
    x = tokens(b=1, n=12)
    torch.manual_seed(7)
    hidden = (~ar.kv_mask(x))[0, :-1].nonzero().flatten().tolist()  # the draw the forward will make
    assert hidden
    y = x.clone()
    y[0, hidden] = (y[0, hidden] + 1) % V
    torch.manual_seed(7)
    _, (a, _) = ar(x, return_outputs=True)
    torch.manual_seed(7)
    _, (b, _) = ar(y, return_outputs=True)
    others = [i for i in range(11) if i not in hidden]
    torch.testing.assert_close(a[0, others], b[0, others])  # nobody reads a hidden token
    plain = AutoregressiveWrapper(ar.net)
    _, (c, _) = plain(x, return_outputs=True)
    _, (d, _) = plain(y, return_outputs=True)
    assert not torch.allclose(c[0, others], d[0, others], atol=1e-4)  # without mask_prob they would


def test_forward_lens_and_return_outputs():
    ar = AutoregressiveWrapper(net())
    x = tokens(n=9)
    lens = torch.tensor([9, 6])
    mask = torch.arange(9)[None] < lens[:, None]
    torch.testing.assert_close(ar(x, lens=lens), ar(x, mask))
    loss, (logits, inter) = ar(x, return_outputs=True)
    torch.testing.assert_close(logits, ar.net(x[:, :-1]))
    torch.testing.assert_close(loss, F.cross_entropy(logits.transpose(1, 2), x[:, 1:]))
    assert inter.cache_length == 8
    # upstream's prepend_embeds: read ahead of the tokens, no loss on them
    prefix = torch.randn(2, 3, 32)
    logits = ar.net(x[:, :-1], prepend_embeds=prefix, excise_prepend_embeds=True)
    torch.testing.assert_close(ar(x, prepend_embeds=prefix), F.cross_entropy(logits.transpose(1, 2), x[:, 1:]))
    # prepended embeddings (upstream's): the loss is over the token columns of the net's output
    pre, pre_mask = torch.randn(2, 3, 32), torch.tensor([[True, False, True], [True, True, True]])
    logits = ar.net(x[:, :-1], prepend_embeds=pre, prepend_mask=pre_mask, excise_prepend_embeds=True)
    assert logits.shape[1] == 8
    torch.testing.assert_close(ar(x, prepend_embeds=pre, prepend_mask=pre_mask),
                               F.cross_entropy(logits.transpose(1, 2), x[:, 1:]))
    assert not torch.allclose(ar(x, prepend_embeds=pre, prepend_mask=pre_mask), ar(x))
