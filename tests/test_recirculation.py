"""Recirculation (recirculation.py, arXiv 2608.17981): the mix of eq. 1-2, the replay's effect on
the cache, the first-pass read-out, generation, the learned mixer, errors."""

import pytest
import torch
import torch.nn.functional as F

from train_helpers import assert_loss_falls

from x_transformers import Decoder, TransformerWrapper
from x_transformers.cache import KVCache
from x_transformers.recirculation import Recirculation, norm_matched

V = 32


def net(seed=0, **kw):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=32, depth=4, heads=4,
                                                                               rotary_pos_emb=True), **kw).eval()


def tokens(b=2, n=6, seed=1):
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(seed))


def test_the_mix_is_a_norm_matched_convex_combination():
    rec = Recirculation(net(), source_layer=3, destination_layer=1, alpha=0.3, ramp_steps=4)
    hiddens = [torch.randn(2, 1, 32) for _ in range(4)]
    z_s, z_d = hiddens[3], hiddens[1]
    matched = norm_matched(z_s, z_d)
    torch.testing.assert_close(matched.norm(dim=-1), z_d.norm(dim=-1))
    torch.testing.assert_close(matched / matched.norm(dim=-1, keepdim=True), z_s / z_s.norm(dim=-1, keepdim=True))
    for step, alpha in ((0, 0.0), (2, 0.15), (4, 0.3), (9, 0.3)):  # alpha ramps up over ramp_steps tokens
        torch.testing.assert_close(rec.mix(hiddens, step)[1], alpha * matched + (1 - alpha) * z_d)
    fixed = Recirculation(net(), source_layer=(3, 2), destination_layer=(1, 0), alpha=(0.5, 0.2), beta=(1.0, 0.7),
                          ramp_steps=0)
    mixed = fixed.mix(hiddens)
    torch.testing.assert_close(mixed[0], 0.2 * norm_matched(hiddens[2], hiddens[0]) + 0.7 * hiddens[0])
    torch.testing.assert_close(mixed[1], 0.5 * norm_matched(hiddens[3], hiddens[1]) + hiddens[1])


def test_with_alpha_zero_it_is_the_plain_model():
    model, x = net(), tokens()
    rec = Recirculation(model, source_layer=3, destination_layer=0, alpha=0.0)
    torch.testing.assert_close(rec(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_replay_rewrites_the_token_keys_from_the_destination_up_and_keeps_the_first_pass_read_out():
    model, x = net(), tokens(n=4)
    rec = Recirculation(model, source_layer=3, destination_layer=1, alpha=0.5, ramp_steps=0)
    cache = KVCache()
    rec(x[:, :3], cache=cache)
    ref = cache.copy()  # the first pass on the same cache
    ref_logits = model(x[:, 3:], cache=ref)
    logits = rec(x[:, 3:], cache=cache)
    torch.testing.assert_close(logits, ref_logits)  # the token's own logits: its first pass
    blocks = rec.attn_blocks
    for layer, index in enumerate(blocks):
        same = torch.allclose(cache.layers[index].k[..., -1:, :], ref.layers[index].k[..., -1:, :], atol=1e-6)
        assert same == (layer < 1), layer  # below the destination nothing changed; from it up, the keys moved
    assert cache.seq_len == ref.seq_len == 4 and torch.equal(cache.positions, ref.positions)
    # the next token reads the recirculated keys: it differs from the plain model's reading
    assert not torch.allclose(rec(x[:, :1], cache=cache), model(x[:, :1], cache=ref))


def test_generate_is_the_recirculated_reading_of_its_own_output():
    rec = Recirculation(net(), source_layer=2, destination_layer=0, alpha=0.4, ramp_steps=2)
    prompt = tokens(n=3)
    out = rec.generate(prompt, 5, temperature=0.0)
    full = torch.cat((prompt, out), dim=1)
    assert torch.equal(rec(full)[:, 2:-1].argmax(-1), out)


def test_memory_tokens_keep_their_columns():
    model = net(num_memory_tokens=2)
    x = tokens(n=4)
    torch.testing.assert_close(Recirculation(model, 3, 0, alpha=0.0)(x), model(x), atol=1e-5, rtol=1e-5)
    logits, cache = Recirculation(model, 3, 0, alpha=0.5)(x, return_intermediates=True)
    assert cache.seq_len == 2 + 4 and torch.isfinite(logits).all()


def test_the_learned_mixer_starts_at_its_init_and_learns():
    torch.manual_seed(0)
    rec = Recirculation(net(), source_layer=3, destination_layer=1, use_learned=True)
    hiddens = [torch.randn(2, 1, 32) for _ in range(4)]
    alpha, beta = rec.learned_mixers[0](hiddens[3], hiddens[1])
    assert (alpha - 0.1).abs().max() < 0.05 and (beta - 0.9).abs().max() < 0.05
    before = [p.detach().clone() for p in rec.net.parameters()]
    loss = rec.learn_parameters(tokens(b=8, n=5), steps=3, batch_size=4)
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.equal(a, b) for a, b in zip(before, rec.net.parameters()))  # the net stays frozen
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rec.learned_mixers.parameters())


def test_a_toy_model_learns_through_the_recirculated_reading():
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=8, max_seq_len=16, attn_layers=Decoder(dim=16, depth=2, heads=2,
                                                                                rotary_pos_emb=True))
    rec = Recirculation(model, source_layer=1, destination_layer=0, alpha=0.3, ramp_steps=0)
    data = (torch.arange(6)[None] + torch.randint(0, 8, (8, 1))) % 8  # counting sequences
    assert_loss_falls(rec, data, steps=200, lr=1e-2,
                      objective=lambda m, d: F.cross_entropy(m(d)[:, :-1].transpose(1, 2), d[:, 1:]))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(source_layer=1, destination_layer=2), ValueError, "destination_layer 2 must be shallower"),
    (dict(source_layer=4, destination_layer=0), ValueError, r"block indices in \[0, 4\)"),
    (dict(source_layer=(3, 2), destination_layer=(1, 1)), ValueError, "must not repeat"),
    (dict(source_layer=(3, 2), destination_layer=1), ValueError, "must pair up"),
    (dict(source_layer=3, destination_layer=1, alpha=1.5), ValueError, r"alpha must be a number in \[0, 1\]"),
    (dict(source_layer=3, destination_layer=1, ramp_steps=-1), ValueError, "ramp_steps must be an integer >= 0"),
])
def test_bad_construction_is_one_line_naming_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        Recirculation(net(), **kwargs)


def test_models_it_cannot_wrap_are_refused():
    torch.manual_seed(0)
    from x_transformers import Encoder
    enc = TransformerWrapper(num_tokens=V, max_seq_len=8, attn_layers=Encoder(dim=16, depth=2, heads=2))
    with pytest.raises(TypeError, match="over a Decoder"):
        Recirculation(enc, 1, 0)
    looped = TransformerWrapper(num_tokens=V, max_seq_len=8, looped=True, attn_layers=Decoder(
        dim=16, depth=2, heads=2, pre_and_post_norm=True))
    with pytest.raises(ValueError, match="looped"):
        Recirculation(looped, 1, 0)
    with pytest.raises(ValueError, match="learn_parameters needs use_learned=True"):
        Recirculation(net(), 3, 1).learn_parameters(tokens())
    with pytest.raises(ValueError, match="x must be token ids"):
        Recirculation(net(), 3, 1)(torch.randn(2, 3))
