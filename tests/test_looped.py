"""The looped LM (looped.py; Zhu et al., arXiv 2510.25741): the stack rerun on its own output,
the exit gate, its loss, cached decoding and early exit."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.cache import KVCache, StaticKVCache
from x_transformers.config import ConfigConflictError

V = 64


def net(steps=3, seed=0, **kw):
    torch.manual_seed(seed)
    layers = dict(dim=32, depth=2, heads=4, pre_and_post_norm=True, rotary_pos_emb=True)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, looped=True, max_looped_steps=steps, use_abs_pos_emb=False,
                              attn_layers=Decoder(**layers), **kw)


def tokens(b=2, n=10, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def test_one_loop_step_is_the_plain_model():
    looped = net(steps=1).eval()
    torch.manual_seed(0)
    plain = TransformerWrapper(num_tokens=V, max_seq_len=32, use_abs_pos_emb=False, attn_layers=Decoder(
        dim=32, depth=2, heads=4, pre_and_post_norm=True, rotary_pos_emb=True)).eval()
    missing, unexpected = plain.load_state_dict(looped.state_dict(), strict=False)
    assert missing == [] and unexpected == ["exit_gate.weight"]
    x = tokens()
    torch.testing.assert_close(looped(x), plain(x), atol=0, rtol=0)
    # the loss too: one step's exit distribution is all on it, and there is no gate target
    torch.testing.assert_close(AutoregressiveWrapper(looped)(x), AutoregressiveWrapper(plain)(x))


def test_t_steps_run_the_stack_t_times_on_its_own_output():
    model, x = net(steps=4).eval(), tokens()
    h = model.token_emb(x)
    outs = []
    for _ in range(3):
        h = model.attn_layers(h)
        outs.append(h)
    logits, inter = model(x, looped_steps=3, return_intermediates=True, looped_pred_all_logits=True)
    torch.testing.assert_close(logits, model.logits_from(outs[-1]))
    assert len(inter.all_pred_logits) == len(inter.exit_logits) == 3
    for out, step_logits, gate in zip(outs, inter.all_pred_logits, inter.exit_logits):
        torch.testing.assert_close(step_logits, model.logits_from(out))
        torch.testing.assert_close(gate, model.exit_gate(out))
    assert inter.exit_indices.tolist() == [[2], [2]]
    assert len(model(x, return_intermediates=True)[1].all_pred_logits) == 0  # eval: only in training by default


def test_the_loss_weights_each_step_by_the_exit_distribution_and_trains_the_gate_on_upstreams_target():
    model, x = net(steps=3).train(), tokens(n=9)
    ar = AutoregressiveWrapper(model, looped_loss_threshold_exit=0.1, looped_loss_slope=20.0, looped_exit_loss_weight=0.5)
    torch.manual_seed(5)
    loss = ar(x)
    _, inter = model(x[:, :-1], return_intermediates=True)
    target = x[:, 1:]
    b, n = target.shape
    expected_lm, expected_gate, count = 0.0, 0.0, 0
    for i in range(b):
        for j in range(n):
            step_loss = [F.cross_entropy(lg[i, j], target[i, j]).item() for lg in inter.all_pred_logits]
            lam = [torch.sigmoid(g[i, j, 0]).item() for g in inter.exit_logits]
            alive = 1.0
            for t in range(3):
                p = alive * (lam[t] if t < 2 else 1.0)  # the last step takes what is left
                expected_lm += p * step_loss[t]
                alive *= 1 - lam[t]
            for t in range(2):
                y = 1 / (1 + torch.exp(torch.tensor(-20.0 * (step_loss[t + 1] - step_loss[t] + 0.1)))).item()
                g = inter.exit_logits[t][i, j, 0].item()
                expected_gate += -(y * F.logsigmoid(torch.tensor(g)) + (1 - y) * F.logsigmoid(torch.tensor(-g))).item()
            count += 1
    # upstream averages the weighted losses over steps and tokens alike (a masked mean over (b, T, n))
    expected = expected_lm / (3 * count) + 0.5 * expected_gate / (2 * count)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.exit_gate.weight.grad.abs().sum() > 0  # the gate learns from its own loss


@pytest.mark.parametrize("make", [KVCache, "static"])
def test_cached_decoding_equals_the_full_forward_at_a_fixed_number_of_steps(make):
    model, x = net(steps=3).eval(), tokens(n=8)
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[1, :2] = False
    ref = model(x, keep)
    cache = KVCache() if make is KVCache else StaticKVCache.for_model(model, 2, 8)
    outs = [model(x[:, :3], keep[:, :3], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(outs, dim=1)[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_early_exit_follows_the_cumulative_exit_probability():
    model = net(steps=6).eval()
    torch.nn.init.zeros_(model.exit_gate.weight)  # every step exits with probability 1/2: cdf .5 .75 .875 .9375
    x = tokens(b=1, n=1)
    for threshold, index in ((0.5, 0), (0.7, 1), (0.9, 3), (0.95, 4), (0.99, 5)):
        _, inter = model(x, looped_inference=True, looped_exit_prob_threshold=threshold, return_intermediates=True)
        assert inter.exit_indices.item() == index, threshold
    # looped_steps fixes the count; several new tokens (a prompt) run every step
    assert model(x, looped_steps=6, looped_inference=True, return_intermediates=True)[1].exit_indices.item() == 5
    _, inter = model(tokens(b=1, n=4), looped_inference=True, return_intermediates=True)
    assert inter.exit_indices.item() == 5


def test_a_token_that_exits_early_lends_its_keys_to_the_later_steps():
    model = net(steps=4).eval()
    torch.nn.init.zeros_(model.exit_gate.weight)
    cache = KVCache()
    model(tokens(b=1, n=5), cache=cache)  # the prompt: every step
    _, inter = model(tokens(b=1, n=1, seed=3), cache=cache, looped_inference=True, looped_exit_prob_threshold=0.7,
                     return_intermediates=True)
    assert inter.exit_indices.item() == 1
    for index, layer in cache.layers.items():
        if isinstance(index, tuple):
            continue
        step1 = cache.layer((1, index))
        for step in (2, 3):
            later = cache.layer((step, index))
            assert later.k.shape == step1.k.shape == layer.k.shape
            torch.testing.assert_close(later.k[..., -1:, :], step1.k[..., -1:, :])
            assert not torch.equal(later.k[..., :-1, :], step1.k[..., :-1, :])  # the prompt's own keys stay


def test_rows_of_a_batch_exit_on_their_own_as_if_decoded_alone():
    model = net(steps=5).eval()
    torch.nn.init.normal_(model.exit_gate.weight, std=0.3)  # gate logits that differ from row to row
    prompts, news = tokens(b=4, n=5, seed=4), tokens(b=4, n=3, seed=5)
    cache = KVCache()
    model(prompts, cache=cache)
    batched, exits = [], []
    for t in range(3):
        logits, inter = model(news[:, t:t + 1], cache=cache, looped_inference=True, looped_exit_prob_threshold=0.6,
                              return_intermediates=True)
        batched.append(logits)
        exits.append(inter.exit_indices)
    exits = torch.cat(exits, dim=1)
    assert len(set(exits.flatten().tolist())) > 1  # the rows stopped at different steps
    for r in range(4):
        alone = KVCache()
        model(prompts[r:r + 1], cache=alone)
        for t in range(3):
            logits, inter = model(news[r:r + 1, t:t + 1], cache=alone, looped_inference=True,
                                  looped_exit_prob_threshold=0.6, return_intermediates=True)
            torch.testing.assert_close(logits, batched[t][r:r + 1], atol=1e-5, rtol=1e-5)
            assert inter.exit_indices.item() == exits[r, t]


def test_generate_samples_with_early_exit_and_reports_it():
    model = net(steps=4)
    torch.nn.init.zeros_(model.exit_gate.weight)
    ar = AutoregressiveWrapper(model)
    prompt = tokens(b=1, n=4)
    out, inter = ar.generate(prompt, 6, temperature=0.0, return_intermediates=True, looped_exit_prob_threshold=0.7)
    assert inter.exit_indices.tolist() == [[3, 1, 1, 1, 1, 1]]  # the prompt runs every step
    assert len(inter.looped_prompt_kv_cache) == 4 and inter.looped_prompt_kv_cache[0][0][0].shape[-2] == 4
    # fixed steps with any batch: greedy cached generation equals the uncached one
    batch = tokens(b=2, n=4)
    cached = ar.generate(batch, 6, temperature=0.0, looped_steps=3)
    model.eval()
    seq = batch
    for _ in range(6):
        seq = torch.cat((seq, model(seq, looped_steps=3)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(cached, seq[:, 4:])


def test_a_toy_looped_model_learns():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=16, max_seq_len=16, looped=True, max_looped_steps=3, attn_layers=Decoder(
        dim=32, depth=1, heads=2, pre_and_post_norm=True))
    ar = AutoregressiveWrapper(model)
    data = (torch.arange(16)[None] + torch.randint(0, 16, (8, 1))) % 16  # counting sequences
    opt = torch.optim.Adam(ar.parameters(), lr=3e-3)
    first = ar(data).item()
    for _ in range(200):
        opt.zero_grad()
        loss = ar(data)
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


@pytest.mark.parametrize("build, error, message", [
    (lambda: TransformerWrapper(num_tokens=V, looped=True, max_seq_len=8, attn_layers=Decoder(dim=16, depth=1, heads=2)),
     ConfigConflictError, "pre_and_post_norm"),
    (lambda: net(recycling=True), ConfigConflictError, "recycling"),
    (lambda: net(steps=0), ValueError, "max_looped_steps"),
    (lambda: TransformerWrapper(num_tokens=V, max_looped_steps=2, max_seq_len=8, attn_layers=Decoder(
        dim=16, depth=1, heads=2)), ValueError, "max_looped_steps configures looped, which is off"),
    (lambda: AutoregressiveWrapper(TransformerWrapper(num_tokens=V, max_seq_len=8, attn_layers=Decoder(
        dim=16, depth=1, heads=2)), looped_loss_slope=5), ValueError, "looped_loss_slope configures the looped loss"),
    (lambda: AutoregressiveWrapper(net(), looped_exit_loss_weight=-1), ValueError, "looped_exit_loss_weight"),
])
def test_bad_construction_is_one_line_naming_the_keyword(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize("kwargs, message", [
    (dict(looped_steps=0), "looped_steps must be an integer >= 1"),
    (dict(max_looped_steps=1.5), "max_looped_steps must be an integer >= 1"),
    (dict(looped_exit_prob_threshold=0.0), "looped_exit_prob_threshold must be a probability"),
])
def test_bad_forward_inputs_are_one_line_naming_the_argument(kwargs, message):
    x = kwargs.pop("x", tokens())
    with pytest.raises(ValueError, match=message):
        net()(x, **kwargs)


def test_looped_keywords_on_a_plain_net_and_caches_too_short_are_refused():
    plain = TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(ValueError, match="looped_steps= needs a wrapper built with looped=True"):
        plain(tokens(), looped_steps=2)
    with pytest.raises(ValueError, match="max_looped_steps= needs a net built with looped=True"):
        AutoregressiveWrapper(plain).generate(tokens(), 2, max_looped_steps=2)
    model, cache = net(steps=2).eval(), KVCache()
    model(tokens(n=3), cache=cache)
    with pytest.raises(ValueError, match="the cache holds keys of 2 loop steps"):
        model(tokens(n=1), cache=cache, looped_steps=3)


def test_a_looped_stack_without_attention_decodes_with_a_cache():
    """top_attn_to_ff turning every attention block into a feed-forward leaves the cache no keys: any
    number of loop steps decodes (it used to claim the cache held one step), equal to the full forward."""
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, looped=True, max_looped_steps=3,
                             attn_layers=Decoder(dim=16, depth=2, heads=2, pre_and_post_norm=True, top_attn_to_ff=2)).eval()
    prompt = torch.randint(0, 20, (2, 4))
    cached = AutoregressiveWrapper(net).generate(prompt, 5, temperature=0.0, looped_steps=3)
    uncached = AutoregressiveWrapper(net).generate(prompt, 5, temperature=0.0, looped_steps=3, cache_kv=False)
    assert torch.equal(cached, uncached)
