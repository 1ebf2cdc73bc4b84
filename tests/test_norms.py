"""Norms: each test checks the defining formula of its paper."""

import torch

from x_transformers import Encoder
from x_transformers.norms import LayerNorm, RMSNorm, ScaleNorm


def norms_of(model):
    return [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm, ScaleNorm))]


def test_scalenorm_is_one_scalar_times_unit_vector():
    # 1910.05895: ScaleNorm(x) = g * x / ||x|| with one learned scalar g per norm
    model = Encoder(dim=32, depth=2, heads=4, use_scalenorm=True)
    norms = norms_of(model)
    assert norms and all(isinstance(n, ScaleNorm) for n in norms)
    for n in norms:
        params = list(n.parameters())
        assert len(params) == 1 and params[0].numel() == 1
    norm = norms[0]
    with torch.no_grad():
        norm.g.fill_(2.5)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(norm(x), 2.5 * x / x.norm(dim=-1, keepdim=True))
    # a norm depends on the direction of x only
    torch.testing.assert_close(norm(7.0 * x), norm(x))


def test_rmsnorm_has_no_mean_subtraction_and_per_channel_gain():
    # 1910.07467: RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g, g per channel, no centring
    model = Encoder(dim=32, depth=2, heads=4, use_rmsnorm=True)
    norms = norms_of(model)
    assert norms and all(isinstance(n, RMSNorm) for n in norms)
    norm = norms[0]
    assert [p.shape for p in norm.parameters()] == [torch.Size([32])]
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 32))
    x = torch.randn(3, 5, 32)
    ref = x / (x.square().mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), ref)
    # no mean subtraction: shifting every channel by a constant changes the output,
    # where LayerNorm (which centres) would not notice it
    shift = torch.full_like(x, 3.0)
    assert (norm(x + shift) - norm(x)).abs().max() > 0.1
    ln = LayerNorm(32)
    torch.testing.assert_close(ln(x + shift), ln(x), atol=1e-4, rtol=1e-4)
