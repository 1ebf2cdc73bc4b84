"""ContinuousTransformerAutoencoder: the deterministic bottleneck learns to reconstruct a toy set
almost exactly; the variational bottleneck's loss is the closed-form Gaussian KL; reconstruction
of frame i reads only the latent and frames < i (teacher forcing), and a dropped latent leaves
no trace; padded frames count nowhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from x_transformers.continuous_autoencoder import ContinuousTransformerAutoencoder, VariationalLatentBottleneck

DIN = 4


def auto(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    base = dict(dim=32, enc_depth=1, dec_depth=1, max_seq_len=16, dim_input=DIN, dim_latent=8, heads=2,
                attn_dim_head=16)
    return ContinuousTransformerAutoencoder(**(base | kw))


def test_the_deterministic_bottleneck_reconstructs_a_toy_set_almost_exactly():
    model = auto(latents_dropout_prob=0.0)
    data = torch.randn(4, 6, DIN, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        loss, (recon, aux) = model(data, return_all_losses=True)
        assert aux is None
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(loss.item())
    assert losses[199] < 0.7 * losses[0]
    model.eval()
    assert model(data).item() < 0.02 * losses[0]  # the first frame too: it comes from the latent alone


def test_the_variational_kl_is_the_closed_form_gaussian_kl():
    model = auto(bottleneck_type="variational", latents_dropout_prob=0.0).eval()
    seq = torch.randn(3, 7, DIN)
    pooled = model.encoder(seq, return_embeddings=True).mean(dim=1)
    mean, log_var = model.bottleneck.to_mean_log_var(pooled).chunk(2, dim=-1)
    by_torch = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(-1)
    total, (recon, kl) = model(seq, return_all_losses=True)
    torch.testing.assert_close(kl, by_torch.mean())
    torch.testing.assert_close(total, recon + kl)
    _, (_, kl_rows) = model(seq, return_all_losses=True, return_unreduced_loss=True)
    torch.testing.assert_close(kl_rows, by_torch)
    floored = VariationalLatentBottleneck(32, 8, kl_div_floor=0.2)
    floored.load_state_dict(model.bottleneck.state_dict())
    _, kl_floor = floored(pooled)
    per_dim = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_floor, (per_dim - 0.2).clamp(min=0).sum(-1).mean())


def test_frame_i_is_rebuilt_from_the_latent_and_earlier_frames_only():
    model = auto().eval()
    seq = torch.randn(2, 8, DIN)
    latents = torch.randn(2, 8)
    base = model.decode(latents, seq)
    changed = seq.clone()
    changed[:, 5] += 1.0
    out = model.decode(latents, changed)
    torch.testing.assert_close(out[:, :6], base[:, :6])  # frames 0..5 never read frame 5
    assert (out[:, 6:] - base[:, 6:]).abs().max() > 1e-4
    other = model.decode(torch.randn(2, 8), seq)
    assert (other[:, 0] - base[:, 0]).abs().max() > 1e-4  # the first frame comes from the latent
    # a dropped latent leaves no trace
    hidden = torch.tensor([False, True])
    a = model.decode(latents, seq, shown=hidden)
    b = model.decode(torch.randn(2, 8), seq, shown=hidden)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_padded_frames_count_nowhere(loss_type):
    model = auto(loss_type=loss_type, latents_dropout_prob=0.0).eval()
    seq = torch.randn(2, 9, DIN)
    lens = torch.tensor([9, 5])
    noisy = seq.clone()
    noisy[1, 5:] = 100.0
    torch.testing.assert_close(model.encode(seq, lens), model.encode(noisy, lens))
    rows = model(noisy, lens=lens, return_unreduced_loss=True)
    short = model(seq[1:, :5])
    torch.testing.assert_close(rows[1], short, atol=1e-5, rtol=1e-5)
    fn = F.l1_loss if loss_type == "l1" else F.mse_loss
    recon = model.decode(model.encode(seq, lens), seq, lens)
    expected = torch.stack([fn(recon[0], seq[0]), fn(recon[1, :5], seq[1, :5])])
    torch.testing.assert_close(model(seq, lens=lens, return_unreduced_loss=True), expected)


def test_a_custom_bottleneck_and_upstreams_conventions():
    class Halve(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 8)

        def forward(self, x, return_unreduced_loss=False):
            lat = self.proj(x)
            aux = lat.square().sum(-1)
            return lat, aux if return_unreduced_loss else aux.mean()

    model = auto(bottleneck=Halve())
    seq = torch.randn(2, 6, DIN)
    total, (recon, aux) = model(seq, return_all_losses=True)
    torch.testing.assert_close(total, recon + aux)
    assert model.encode(seq).shape == (2, 8)
    det = auto(deterministic_bottleneck_kwargs=dict(activation=nn.Tanh()))
    assert det.encode(seq).abs().max() < 1


def test_bad_inputs_raise_one_line_errors_naming_the_argument():
    for kw, match in ((dict(bottleneck_type="vq"), "bottleneck_type"), (dict(loss_type="huber"), "loss_type"),
                      (dict(latents_dropout_prob=-0.1), "latents_dropout_prob"), (dict(dim_latent=0), "dim_latent"),
                      (dict(bottleneck_type="variational", variational_bottleneck_kwargs=dict(kl_div_floor=-1)),
                       "kl_div_floor")):
        with pytest.raises(ValueError, match=match):
            auto(**kw)
    with pytest.raises(TypeError, match="bottleneck"):
        auto(bottleneck="tanh")
    model = auto()
    seq = torch.randn(2, 6, DIN)
    for call, match in ((lambda: model(seq[..., :3]), "seq"), (lambda: model(seq.long()), "seq"),
                        (lambda: model(seq, lens=torch.tensor([6])), "lens"),
                        (lambda: model(seq, lens=torch.tensor([6, 7])), "lens"),
                        (lambda: model.decode(torch.randn(2, 3), seq), "latents")):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)
