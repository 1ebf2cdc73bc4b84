"""FreeTransformer (2510.17558): the binary mapper's KL and straight-through codes, where the
latent enters the decoder, generation, training, and the inputs it refuses."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, kl_divergence

from x_transformers.free_transformer import NAT, BinaryMapper, FreeTransformer, binary_entropy
from train_helpers import assert_loss_falls

V = 16


def _model(**kwargs):
    torch.manual_seed(0)
    options = dict(num_tokens=V, max_seq_len=32, dim=32, heads=2, attn_dim_head=16, dec_head_depth=1,
                   dec_tail_depth=2, enc_depth=1, latent_bits=3)
    return FreeTransformer(**{**options, **kwargs})


def test_kl_is_zero_when_the_posterior_is_the_uniform_prior():
    mapper = BinaryMapper(bits=5, kl_loss_threshold=0.0)
    assert mapper.kl(torch.zeros(3, 7, 5)).item() == 0.0
    assert binary_entropy(torch.zeros(5)).item() == pytest.approx(5 * NAT)


def test_kl_is_the_bits_kl_from_fair_coins_above_the_free_bits():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 5) * 2
    exact = kl_divergence(Bernoulli(logits=logits), Bernoulli(probs=torch.full_like(logits, 0.5))).sum(-1)  # (4, 6)
    torch.testing.assert_close(BinaryMapper(5, kl_loss_threshold=0.0).kl(logits), exact.mean())
    threshold = float(exact.median())
    torch.testing.assert_close(BinaryMapper(5, kl_loss_threshold=threshold).kl(logits),
                               (exact - threshold).clamp(min=0).mean())
    # below the free bits: no loss and no gradient pulling the posterior to the prior
    small = (torch.randn(2, 5) * 0.1).requires_grad_()
    loss = BinaryMapper(5).kl(small)  # default threshold: one bit
    loss.backward()
    assert loss.item() == 0.0 and small.grad.abs().max() == 0


def test_codes_are_one_hot_samples_with_the_code_probabilities_gradient():
    mapper = BinaryMapper(bits=3).train()
    torch.manual_seed(1)
    logits = torch.randn(5, 3, requires_grad=True)
    one_hot, _ = mapper(logits)
    hard = one_hot.detach().round()  # (exact up to the rounding of + p - p)
    torch.testing.assert_close(one_hot.detach(), hard)
    assert torch.equal(hard.sum(-1), torch.ones(5)) and set(hard.unique().tolist()) == {0.0, 1.0}
    # code i's probability is the product over bits of p or 1 - p, and that is what the gradient sees
    p = logits.sigmoid()
    probs = torch.stack([torch.prod(torch.where(mapper.codes[i], p, 1 - p), dim=-1) for i in range(8)], dim=-1)
    w = torch.randn(8)
    grad, = torch.autograd.grad((one_hot * w).sum(), logits)
    expected, = torch.autograd.grad((probs * w).sum(), logits)
    torch.testing.assert_close(grad, expected)
    # saturated bits pick their code: bits (1, 0, 1), least significant first, are code 5
    sure = torch.tensor([[30.0, -30.0, 30.0]])
    assert mapper.eval()(sure)[0].argmax(-1).item() == 5


def test_the_latent_enters_at_the_tail_and_reaches_only_its_position_and_later():
    model = _model().eval()
    torch.manual_seed(2)
    tokens = torch.randint(0, V, (2, 8))
    codes = torch.nn.functional.one_hot(torch.randint(0, 8, (2, 8)), 8).float()
    heads = []
    model.decoder_head.register_forward_hook(lambda m, i, o: heads.append(o))
    base = model.logits_given_latents(tokens, codes)
    other = codes.clone()
    other[:, 5] = other[:, 5].roll(1, dims=-1)  # another code at position 5 only
    moved = model.logits_given_latents(tokens, other)
    torch.testing.assert_close(heads[0], heads[1])  # the first half never sees the latent
    torch.testing.assert_close(moved[:, :5], base[:, :5])
    assert (moved[:, 5:] - base[:, 5:]).abs().amax(dim=(0, 2)).min() > 0
    # a per-sequence code moves every position
    whole = model.logits_given_latents(tokens, codes[:, :1])
    assert (whole - model.logits_given_latents(tokens, codes[:, :1].roll(1, -1))).abs().amax(dim=(0, 2)).min() > 0


@pytest.mark.parametrize("options", [dict(), dict(per_token_latents=False, dec_head_depth=0)])
def test_loss_parts_and_every_parameter_gets_a_finite_gradient(options):
    model = _model(kl_loss_threshold=0.0, kl_loss_weight=0.5, **options).train()
    torch.manual_seed(3)
    seq = torch.randint(0, V, (2, 10))
    loss, (ar, kl) = model(seq, return_all_losses=True)
    torch.testing.assert_close(loss, ar + 0.5 * kl)
    assert 0 < ar.item() < 2 * math.log(V) and kl.item() > 0
    loss.backward()
    unused = {"latent_pos_emb.weight"} if not options.get("per_token_latents", True) else set()
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_separate_sequence_gives_one_latent_and_padding_is_ignored():
    model = _model(pad_id=0, kl_loss_threshold=0.0).eval()
    torch.manual_seed(4)
    seq = torch.randint(1, V, (2, 9))
    source = torch.randint(1, V, (2, 5))
    padded = torch.cat((source, torch.zeros(2, 3, dtype=torch.long)), dim=1)
    h = model._head(source)
    h_padded = model._head(padded)
    # the encoder reads the whole source, not its padding: the same bit logits
    logits = model.to_latent_bit_logits(model.encoder(model.query_token_for_latents.expand(2, 1, -1), context=h))
    logits_padded = model.to_latent_bit_logits(model.encoder(model.query_token_for_latents.expand(2, 1, -1),
                                                             context=h_padded, context_mask=padded != 0))
    torch.testing.assert_close(logits, logits_padded)
    loss = model(seq, seq_for_latents=padded)
    assert torch.isfinite(loss)
    # how much right padding there is changes nothing: one latent per sequence read under the mask,
    # padded labels ignored
    model = _model(pad_id=0, kl_loss_threshold=0.0, per_token_latents=False).eval()
    torch.manual_seed(5)
    short = model(torch.cat((seq[:, :6], torch.zeros(2, 1, dtype=torch.long)), 1), return_all_losses=True)
    torch.manual_seed(5)
    pad = model(torch.cat((seq[:, :6], torch.zeros(2, 4, dtype=torch.long)), 1), return_all_losses=True)
    torch.testing.assert_close(pad[0], short[0])
    torch.testing.assert_close(pad[1][1], short[1][1])


def test_generation_with_and_without_cache_agrees_and_follows_the_latent():
    model = _model()
    prompt = torch.randint(0, V, (2, 3))
    runs = []
    for cache in (True, False):
        torch.manual_seed(6)
        runs.append(model.generate(prompt, 12, latents=torch.tensor([1, 6]), use_kv_cache=cache))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 12) and torch.equal(runs[0][:, :3], prompt)
    torch.manual_seed(7)
    prior = model.generate(prompt, 12)  # codes from the uniform prior, one per position
    assert prior.shape == (2, 12) and model.training
    assert model.generate(prompt[0], 6, latents=3).shape == (6,)
    # greedy under a near-greedy filter: the first new token is the argmax given the code
    torch.manual_seed(8)
    first = model.generate(prompt, 4, latents=5, filter_logits_fn="top_k", logit_filter_kwargs=dict(k=1))[:, 3]
    code = torch.nn.functional.one_hot(torch.tensor(5), 8).float().expand(2, 1, 8)
    model.eval()
    assert torch.equal(first, model.logits_given_latents(prompt, code)[:, -1].argmax(-1))


def test_toy_training_loss_falls():
    model = _model(latent_bits=2)
    torch.manual_seed(0)
    data = torch.randint(0, V, (4, 12))
    assert_loss_falls(model, data)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dec_tail_depth=0), "dec_tail_depth"),
    (dict(dec_head_depth=-1), "dec_head_depth"),
    (dict(latent_bits=0), "latent_bits"),
    (dict(kl_loss_threshold=-1.0), "kl_loss_threshold"),
    (dict(dim_latent=16), "dim_latent"),
    (dict(latent_dropout_prob=1.0), "latent_dropout_prob"),
    (dict(enc_kwargs=[1]), "enc_kwargs"),
    (dict(per_token_latents=1), "per_token_latents"),
])
def test_bad_construction_is_refused_naming_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _model(**kwargs)


def test_bad_inputs_are_refused_naming_the_argument():
    model = _model()
    seq = torch.randint(0, V, (2, 6))
    for call, match in [
        (lambda: model(seq[0]), "seq must be"),
        (lambda: model(seq[:, :1]), "seq must be"),
        (lambda: model(seq + V), "outside"),
        (lambda: model(seq, seq_for_latents=seq[:1]), "seq_for_latents must have seq's batch"),
        (lambda: model(torch.randint(0, V, (1, 40))), "max_seq_len"),
        (lambda: model.generate(seq, 0), "seq_len"),
        (lambda: model.generate(seq, 8, latents=8), "latents"),
        (lambda: model.generate(seq, 8, latents=torch.ones(3, 8)), "latents"),
        (lambda: model.generate(seq, 8, logit_filter_kwargs=dict(nope=1)), "nope"),
        (lambda: BinaryMapper(3)(torch.zeros(2, 4)), "last dimension of 3"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match):
            call()


def test_stack_kv_residuals_reach_keys_and_values_of_the_named_self_attention_blocks():
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.attention import Attention
    from x_transformers.cache import KVCache

    torch.manual_seed(9)
    stack = Decoder(dim=16, depth=3, heads=2, attn_dim_head=8, rotary_pos_emb=True).eval()
    x, r = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    seen = []
    for mod in stack.modules():
        if isinstance(mod, Attention):
            mod.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs.get("kv_residual")),
                                      with_kwargs=True)
    full = stack(x, self_attn_kv_residuals=r)
    assert torch.equal(seen[0], r) and seen[1:] == [None, None]  # (b, n, dim): the first self-attention only
    seen.clear()
    stack(x, self_attn_kv_residuals=torch.stack((r, r * 2)))
    assert torch.equal(seen[1], r * 2) and seen[2] is None  # (L, b, n, dim): the l-th for the l-th
    # cached decoding, the residual given per new token, agrees with the full forward
    cache = KVCache()
    steps = [stack(x[:, :2], cache=cache, self_attn_kv_residuals=r[:, :2])]
    steps += [stack(x[:, t:t + 1], cache=cache, self_attn_kv_residuals=r[:, t:t + 1]) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    for bad, match in [(r[0], "self_attn_kv_residuals must be a float tensor"),
                       (torch.randn(4, 2, 6, 16), "L <= 3"), (torch.randn(2, 3, 16), "n=6 or 1")]:
        with pytest.raises(ValueError, match=match):
            stack(x, self_attn_kv_residuals=bad)
    with pytest.raises(ValueError, match="reversible"):
        Decoder(dim=16, depth=1, heads=2, reversible=True)(x, self_attn_kv_residuals=r)
    with pytest.raises(ValueError, match="attn_shared_qk"):
        Decoder(dim=16, depth=1, heads=2, attn_shared_qk=True)(x, self_attn_kv_residuals=r)
    net = TransformerWrapper(num_tokens=8, max_seq_len=8, attn_layers=Decoder(dim=16, depth=1, heads=2))
    with pytest.raises(TypeError, match="call the layer stack"):
        net(torch.zeros(1, 3, dtype=torch.long), self_attn_kv_residuals=r)
