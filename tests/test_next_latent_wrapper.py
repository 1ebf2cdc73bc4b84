"""NextLatentWrapper: the rollout losses against a by-hand computation, the stop-gradients,
SIGReg, training, and the inputs it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.next_latent_wrapper import NextLatentWrapper, ResidualDynamics
from train_helpers import assert_loss_falls

V, D = 20, 16


def _net(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, attn_layers=Decoder(dim=D, depth=1, heads=2), **kwargs)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2 * D, D), nn.Tanh(), nn.Linear(D, D))


def _by_hand(model, x, R, weights):
    net, f = model.net, model.dynamics_model.net
    inp = x.masked_fill(x == -100, 0)
    h = net(inp, return_embeddings=True)
    ce = F.cross_entropy(net(inp)[:, :-1].transpose(1, 2), x[:, 1:], ignore_index=-100)
    emb = net.token_emb(inp)
    b, n = x.shape
    sums, kls, counts = torch.zeros(R), torch.zeros(R), torch.zeros(R)
    for i in range(b):
        for t in range(n - 1):
            z, before = h[i, t], 0.0
            for s in range(R):
                e = emb[i, t + 1 + s] if t + 1 + s < n else torch.zeros(D)
                z = z + f(torch.cat((z, e)))
                target = h[i, t + 1 + s].detach() if t + 1 + s < n else torch.zeros(D)
                loss = F.mse_loss(z, target)
                dyn = torch.exp(torch.tensor(-before))
                before += loss.item()
                if t + 1 + s < n and x[i, t + 1 + s] != -100:
                    tp = net.logits_from(target).log_softmax(-1)
                    pp = net.logits_from(z).log_softmax(-1)
                    sums[s] += loss * weights[s] * dyn
                    kls[s] += (tp.exp() * (tp - pp)).sum() * weights[s] * dyn
                    counts[s] += 1
    return ce, (sums / counts).sum(), (kls / counts).sum()


def test_losses_are_the_weighted_rollout_errors_computed_by_hand():
    R = 2
    model = NextLatentWrapper(_net(), dim=D, num_rollouts=R, loss_type="mse", dynamics_network=_mlp(),
                              rollout_weights=(3.0, 1.0)).eval()
    torch.manual_seed(2)
    x = torch.randint(0, V, (2, 6))
    x[1, 3] = -100  # an ignored token: no label, and no rollout step lands on it
    total, parts = model(x, return_loss_breakdown=True)
    ce, latent, kl = _by_hand(model, x, R, (0.75, 0.25))
    torch.testing.assert_close(parts.ce, ce)
    torch.testing.assert_close(parts.next_latent, latent)
    torch.testing.assert_close(parts.kl, kl)
    torch.testing.assert_close(total, ce + latent + kl)
    assert parts.sigreg.item() == 0.0


def test_targets_and_the_frozen_head_take_no_gradient():
    model = NextLatentWrapper(_net(), dim=D, num_rollouts=1, dynamics_network=_mlp(), next_latent_loss_weight=1.0)
    x = torch.randint(0, V, (2, 6))
    _, parts = model(x, return_loss_breakdown=True)
    parts.kl.backward(retain_graph=True)
    assert model.net.to_logits.weight.grad is None  # the KL's head is a frozen copy
    # the last position is only ever a target (stop-gradient): its hidden state gets no gradient
    grads = []
    handle = model.net.attn_layers.register_forward_hook(lambda m, i, o: (o.register_hook(grads.append), None)[1])
    model.zero_grad()
    _, parts = model(x, return_loss_breakdown=True)
    (parts.next_latent + parts.kl).backward()
    handle.remove()
    assert grads[0][:, -1].abs().max() == 0 and grads[0][:, :-1].abs().max() > 0


@pytest.mark.parametrize("dynamics, loss_type", [("residual", "smooth_l1"), ("gru", "mse_and_cosine_sim"),
                                                 ("custom", "mse")])
def test_every_parameter_gets_a_finite_gradient(dynamics, loss_type):
    custom = ResidualDynamics(_mlp()) if dynamics == "custom" else None
    model = NextLatentWrapper(_net(), dim=D, num_rollouts=2, dynamics_type=dynamics, dynamics_network=custom,
                              loss_type=loss_type, sigreg_loss_weight=0.1, sigreg_loss_kwargs=dict(num_slices=16))
    model(torch.randint(0, V, (2, 8))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # the built residual dynamics' last layer starts at zero, so the layers before it get none yet
        before_zero_layer = dynamics == "residual" and name.startswith("dynamics_model.net.") \
            and not name.startswith("dynamics_model.net.1.4")
        assert (p.grad.abs().sum() == 0) == before_zero_layer, name


def test_sigreg_is_small_for_standard_normal_samples_and_large_otherwise():
    torch.manual_seed(3)
    gauss = torch.randn(4096, 8)
    assert NextLatentWrapper.sigreg_loss(gauss, num_slices=64) < 2e-3
    assert NextLatentWrapper.sigreg_loss(gauss * 3 + 1, num_slices=64) > 0.05
    assert NextLatentWrapper.sigreg_loss(torch.rand(4096, 8), num_slices=64) > 0.05


def test_toy_training_loss_falls():
    model = NextLatentWrapper(_net(), dim=D, num_rollouts=2)
    torch.manual_seed(0)
    data = torch.randint(0, V, (4, 12))
    assert_loss_falls(model, data)


@pytest.mark.parametrize("build, match", [
    (lambda: NextLatentWrapper(nn.Linear(2, 2), dim=D), "net must be a causal TransformerWrapper"),
    (lambda: NextLatentWrapper(TransformerWrapper(num_tokens=V, max_seq_len=8, attn_layers=Encoder(dim=D, depth=1)),
                               dim=D), "net must be a causal"),
    (lambda: NextLatentWrapper(_net(), dim=D + 1), "dim"),
    (lambda: NextLatentWrapper(_net(), dim=D, num_rollouts=0), "num_rollouts"),
    (lambda: NextLatentWrapper(_net(), dim=D, loss_type="l3"), "loss_type"),
    (lambda: NextLatentWrapper(_net(), dim=D, dynamics_type="lstm"), "dynamics_type"),
    (lambda: NextLatentWrapper(_net(), dim=D, dynamics_type="custom"), "dynamics_network"),
    (lambda: NextLatentWrapper(_net(), dim=D, dynamics_type="gru", dynamics_network=_mlp()), "dynamics_network"),
    (lambda: NextLatentWrapper(_net(), dim=D, num_rollouts=2, rollout_weights=(1.0,)), "rollout_weights"),
    (lambda: NextLatentWrapper(_net(), dim=D, kl_loss_weight=-1), "kl_loss_weight"),
    (lambda: NextLatentWrapper(_net(), dim=D, sigreg_loss_kwargs=dict(slices=3)), "sigreg_loss_kwargs"),
])
def test_bad_construction_is_refused_naming_the_argument(build, match):
    with pytest.raises((TypeError, ValueError), match=match):
        build()


def test_bad_inputs_are_refused_naming_the_argument():
    model = NextLatentWrapper(_net(), dim=D, num_rollouts=3)
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 6))
    with pytest.raises(ValueError, match="num_rollouts"):
        model(torch.randint(0, V, (2, 4)))
