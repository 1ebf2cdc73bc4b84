"""GPTVAE (1312.6114 / ACT 2304.13705): the KL term is the closed-form Gaussian KL with its
free-bits floor; a dropped latent is exactly no latent; the latent is what lets the decoder predict
a sequence's "style" before seeing it, and generation follows the latent it is given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from x_transformers import AutoregressiveWrapper
from x_transformers.gpt_vae import GPTVAE

V = 10


def vae(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(num_tokens=V, dim=32, depth=1, enc_depth=1, max_seq_len=16, heads=2, attn_dim_head=16)
    return GPTVAE(**(base | kw))


def test_kl_is_the_closed_form_gaussian_kl_with_its_floor():
    model = vae(latents_dropout_prob=0.0, dim_latent=8).eval()
    seq = torch.randint(0, V, (3, 12))
    _, (mean, log_var) = model.encode_to_latents(seq, return_mean_log_var=True)
    posterior = Normal(mean, (0.5 * log_var).exp())
    by_torch = kl_divergence(posterior, Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    _, (_, kl) = model(seq, return_all_losses=True)
    torch.testing.assert_close(kl, by_torch.sum(-1).mean())
    floor = by_torch.median().item()
    model.vae_kl_div_floor = floor
    _, (_, kl_floor) = model(seq, return_all_losses=True)
    torch.testing.assert_close(kl_floor, (by_torch - floor).clamp(min=0).sum(-1).mean())


def test_total_is_the_next_token_loss_plus_the_weighted_kl():
    model = vae(latents_dropout_prob=0.0, vae_kl_loss_weight=0.3).eval()
    seq = torch.randint(0, V, (2, 9))
    torch.manual_seed(5)
    total, (ar, kl) = model(seq, return_all_losses=True)
    torch.manual_seed(5)  # the same latent draw, by hand
    latents = model.encode_to_latents(seq)
    logits = model.decoder(seq[:, :-1], prepend_embeds=model.latent_token(latents))[:, 1:]
    torch.testing.assert_close(ar, F.cross_entropy(logits.transpose(1, 2), seq[:, 1:]))
    torch.testing.assert_close(total, ar + 0.3 * kl)


def test_a_dropped_latent_is_exactly_no_latent_and_a_shown_one_steers_the_decoder():
    seq = torch.randint(0, V, (2, 9))
    dropped = vae(latents_dropout_prob=1.0).train()
    dropped.decoder.eval()  # no dropout noise: the comparison is exact
    _, (ar, _) = dropped(seq, return_all_losses=True)
    plain = AutoregressiveWrapper(dropped.decoder)(seq)
    torch.testing.assert_close(ar, plain)
    # the latent's projection learns nothing from dropped rows
    ar.backward()
    assert dropped.from_latent_to_prepend_token.weight.grad is None or \
        dropped.from_latent_to_prepend_token.weight.grad.abs().max() == 0
    shown = vae(latents_dropout_prob=0.0).eval()
    a = shown.decoder(seq, prepend_embeds=shown.latent_token(torch.randn(2, 32)), excise_prepend_embeds=True)
    b = shown.decoder(seq, prepend_embeds=shown.latent_token(torch.randn(2, 32)), excise_prepend_embeds=True)
    assert (a - b).abs().max() > 1e-3


def test_padding_is_ignored_by_the_encoder_and_the_loss():
    model = vae(latents_dropout_prob=0.0, pad_id=-1).eval()
    seq = torch.randint(0, V, (2, 10))
    padded = torch.cat((seq, torch.full((2, 4), -1)), dim=1)
    torch.manual_seed(1)
    lat_a = model.encode_to_latents(seq)
    torch.manual_seed(1)
    lat_b = model.encode_to_latents(padded)
    torch.testing.assert_close(lat_a, lat_b, atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    loss_a = model(seq)
    torch.manual_seed(2)
    loss_b = model(padded)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)


def style_batch(b=16, n=8):
    """Each row: a start token 0, then one 'style' token repeated. Without the latent the first
    style token is a guess among V - 1; with it, it is known."""
    style = torch.randint(1, V, (b, 1))
    return torch.cat((torch.zeros(b, 1, dtype=torch.long), style.expand(-1, n - 1)), dim=1)


def test_training_learns_to_carry_the_style_in_the_latent_and_generation_follows_it():
    model = vae(latents_dropout_prob=0.0, vae_kl_loss_weight=0.01, dim_latent=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(200):
        total, (ar, _) = model(style_batch(), return_all_losses=True)
        opt.zero_grad()
        total.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(ar.item())
    assert losses[-1] < 0.7 * losses[0]
    # the guess of the first style token (log 9 ~ 2.2 nats over 7 targets) is gone: the latent carries it
    model.eval()
    _, (ar, _) = model(style_batch(64), return_all_losses=True)
    assert ar.item() < 0.05
    target = style_batch(4)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 5, seq_for_latents=target, temperature=0.0)
    assert torch.equal(out, target[:, 1:6])


def test_generate_takes_latents_in_upstreams_forms():
    model = vae(dim_latent=4).eval()
    prompt = torch.randint(0, V, (3, 4))
    torch.manual_seed(0)
    one = model.generate(prompt, 3, latents=[0.5, -1.0, 0.0, 2.0], temperature=0.0)
    every = model.generate(prompt, 3, latents=torch.tensor([0.5, -1.0, 0.0, 2.0]).expand(3, -1), temperature=0.0)
    assert torch.equal(one, every) and one.shape == (3, 3)
    unconditioned = model.generate(prompt, 3, temperature=0.0)
    assert torch.equal(unconditioned, AutoregressiveWrapper(model.decoder).generate(prompt, 3, temperature=0.0))
    assert model.generate(prompt[0], 2, latents=[0.0] * 4, temperature=0.0).shape == (2,)
    # the latent's token goes through the cache: the same tokens as decoding without one, beams too
    lat = torch.randn(3, 4)
    for extra in (dict(temperature=0.0), dict(beams=2)):
        assert torch.equal(model.generate(prompt, 4, latents=lat, **extra),
                           model.generate(prompt, 4, latents=lat, cache_kv=False, **extra))


def test_bad_inputs_raise_one_line_errors_naming_the_argument():
    for kw, match in ((dict(latents_dropout_prob=1.5), "latents_dropout_prob"), (dict(dim=0), "dim"),
                      (dict(vae_kl_div_floor=-1.0), "vae_kl_div_floor"), (dict(dim_latent=0), "dim_latent"),
                      (dict(pad_id=0.5), "pad_id")):
        with pytest.raises(ValueError, match=match):
            vae(**kw)
    with pytest.raises(TypeError, match="encoder"):
        vae(encoder="an encoder")
    with pytest.raises(TypeError, match="enc_kwargs"):
        vae(enc_kwargs=[("depth", 2)])
    model = vae(dim_latent=4)
    seq = torch.randint(0, V, (2, 8))
    for call, match in ((lambda: model(seq.float()), "seq"), (lambda: model(seq[:, :1]), "seq"),
                        (lambda: model(seq + V), "seq"),
                        (lambda: model(seq, seq_for_latents=seq[:1]), "seq_for_latents"),
                        (lambda: model.generate(seq, 2, latents=torch.zeros(2, 3)), "latents"),
                        (lambda: model.generate(seq, 2, latents=torch.zeros(2, 4), seq_for_latents=seq),
                         "seq_for_latents"),
                        (lambda: model.generate(seq, 0, latents=torch.zeros(2, 4)), "seq_len"),
                        (lambda: model.generate(seq.float(), 2), "prompts")):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="beam_width"):
        model.generate(seq, 2, latents=torch.zeros(2, 4), beam_width=2)
    class PerToken(torch.nn.Module):  # per-token vectors, not pooled ones
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(V, 32)

        def forward(self, x, mask=None):
            return self.emb(x)

    bad_encoder = vae(encoder=PerToken())
    with pytest.raises(ValueError, match="encoder must return pooled"):
        bad_encoder(seq)


def test_save_and_load_round_trip(tmp_path):
    from x_transformers import from_pretrained

    model = vae(dim_latent=4, vae_kl_loss_weight=0.5).eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert isinstance(loaded, GPTVAE) and loaded.vae_kl_loss_weight == 0.5
    seq = torch.randint(0, V, (2, 8))
    torch.manual_seed(0)
    a = model(seq)
    torch.manual_seed(0)
    torch.testing.assert_close(loaded(seq), a)
