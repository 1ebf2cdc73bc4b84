"""LatentAutoregressive / GPTLeJEPA (upstream's gpt_lejepa; LeJEPA 2511.08544, LLM-JEPA 2509.14252):
every loss term against a computation by hand, the probe's gradient scaling, the replaced head, a
toy run, the inputs it refuses. (Upstream's 2.26.4 test file predates the module: no verbatim test.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from x_transformers import Decoder, Encoder, TransformerWrapper
from x_transformers.gpt_lejepa import GPTLeJEPA, LatentAutoregressive

V, D = 20, 16


def _net(seed=0, tie=False, **wrapper):
    torch.manual_seed(seed)
    return TransformerWrapper(num_tokens=V, max_seq_len=32, tie_embedding=tie, **wrapper,
                              attn_layers=Decoder(dim=D, depth=2, heads=2, rotary_pos_emb=True))


def _sigreg_by_hand(x, dirs, domain=(-5, 5), knots=17):
    """SIGReg with given directions: per direction, the trapezoid integral of |ECF(t) - exp(-t^2/2)|^2
    weighted by exp(-t^2/2), averaged over directions."""
    t = torch.linspace(*domain, knots)
    out = []
    for u in dirs:
        proj = x @ (u / u.norm())
        ecf = torch.exp(1j * proj[:, None] * t[None, :]).mean(dim=0)
        gauss = torch.exp(-0.5 * t ** 2)
        err = (ecf - gauss).abs() ** 2 * gauss
        out.append(torch.trapezoid(err, t))
    return torch.stack(out).mean()


@pytest.mark.parametrize("tie", [False, True])
def test_every_term_matches_a_computation_by_hand(tie):
    R, slices = 3, 8
    model = LatentAutoregressive(_net(tie=tie), dim=D, num_rollouts=R, rollout_loss_weights=(1.0, 0.5, 0.25),
                                 predict_next_embed_no_action=True, sigreg_loss_weight=0.2, l2_loss_weight=0.7,
                                 sigreg_loss_kwargs=dict(num_slices=slices))
    x = torch.randint(0, V, (2, 8))
    x[1, 5:] = -100
    torch.manual_seed(7)
    loss, bd = model(x, return_loss_breakdown=True)

    net = model.net
    inp = x.clamp(min=0)
    h = net(inp, return_embeddings=True)  # (b, n, d), the final states
    assert net.pos_emb is None and net.post_emb_norm is None  # (rotary): the stack reads the token embeddings
    _, inter = net.attn_layers(net.token_emb(inp), return_hiddens=True)
    lower_all = inter.hiddens[-1]  # the last self-attention block's input
    probe = net.to_logits.probe
    head = (lambda z: z @ net.token_emb.weight.t()) if tie else net.to_logits.head
    s = net.logits_scale
    ce = F.cross_entropy(head(probe(h[:, :-1]) * s).transpose(1, 2), x[:, 1:], ignore_index=-100)
    torch.testing.assert_close(bd.ce_loss, ce)

    w = torch.tensor([1.0, 0.5, 0.25]) / 1.75
    unit = F.normalize(h, dim=-1)
    for predictor, action, got in ((model.to_next_embed_pred, True, bd.l2_loss),
                                   (model.to_next_embed_no_action_pred, False, bd.l2_no_action_loss)):
        sums, counts = torch.zeros(R), torch.zeros(R)
        for b in range(2):
            for i in range(7):
                z = lower_all[b, i]
                for k in range(R):
                    nxt = i + 1 + k  # the token this step reaches
                    a = model.action_emb(inp[b, nxt] if nxt < 8 else torch.tensor(0))
                    z = predictor(torch.cat((z, a))[None])[0] if action else predictor(z[None])[0]
                    if nxt < 8 and x[b, nxt] != -100:
                        sums[k] += ((F.normalize(z, dim=-1, eps=1e-6) - unit[b, nxt]) ** 2).sum()
                        counts[k] += D
        torch.testing.assert_close(got, (w * sums / counts).sum())

    torch.manual_seed(7)
    d1, d2 = torch.randn(slices, D), torch.randn(slices, D)
    keep = x[:, 1:] != -100
    sreg = (_sigreg_by_hand(h[:, :-1][keep], d1) + _sigreg_by_hand(lower_all[:, :-1][keep], d2)) / 2
    torch.testing.assert_close(bd.sigreg_loss, sreg.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, ce + 0.8 * 0.7 * (bd.l2_loss + bd.l2_no_action_loss) + 0.2 * sreg.float(),
                               atol=1e-5, rtol=1e-4)


def _trunk_grads(frac):
    model = LatentAutoregressive(_net(), dim=D, frac_gradient=frac)
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(1))
    _, bd = model(x, return_loss_breakdown=True)
    bd.ce_loss.backward()
    trunk = [p.grad for p in model.net.attn_layers.parameters()]
    probe = [p.grad for p in model.net.to_logits.parameters()]
    return trunk, probe


def test_frac_gradient_scales_the_probe_loss_gradient_into_the_trunk():
    trunk0, probe0 = _trunk_grads(0.0)
    assert all(g is None for g in trunk0) and all(g is not None for g in probe0)
    trunk1, probe1 = _trunk_grads(1.0)
    trunk_half, probe_half = _trunk_grads(0.5)
    for full, half in zip(trunk1, trunk_half):
        torch.testing.assert_close(half, 0.5 * full)
    for full, half in zip(probe1, probe_half):
        torch.testing.assert_close(half, full)


def test_the_net_reads_tokens_through_the_probe_and_every_parameter_learns():
    model = GPTLeJEPA(_net(), dim=D, num_rollouts=2, predict_next_embed_no_action=True)
    x = torch.randint(0, V, (2, 8))
    h = model.net(x, return_embeddings=True)
    torch.testing.assert_close(model.net(x), model.net.to_logits.head(model.net.to_logits.probe(h)))
    model(x).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_toy_run_loss_falls():
    """200 Adam steps on one batch; the loss is compared before and after under one seed, so SIGReg
    draws the same random directions both times (its per-step draws make the training curve itself
    noisy: the last step's loss moved between 0.54 and 0.77 of the first with the thread count)."""
    torch.manual_seed(0)
    data = torch.randint(0, V, (4, 12))
    model = LatentAutoregressive(_net(), dim=D, num_rollouts=2, sigreg_loss_kwargs=dict(num_slices=64))

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad():
            return model(data).item()

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        loss = model(data)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("make, match", [
    (lambda: LatentAutoregressive(TransformerWrapper(num_tokens=V, max_seq_len=8, attn_layers=Encoder(dim=D, depth=1)),
                                  dim=D), "causal stack"),
    (lambda: LatentAutoregressive(_net(), dim=D + 1), "dim"),
    (lambda: LatentAutoregressive(_net(num_memory_tokens=2), dim=D), "num_memory_tokens must be 0"),
    (lambda: LatentAutoregressive(_net(), dim=D, num_rollouts=0), "num_rollouts must be an integer >= 1"),
    (lambda: LatentAutoregressive(_net(), dim=D, num_rollouts=2, rollout_loss_weights=(1.0,)), "rollout_loss_weights"),
    (lambda: LatentAutoregressive(_net(), dim=D, predictor_input_hiddens_index=5), "predictor_input_hiddens_index"),
    (lambda: LatentAutoregressive(_net(), dim=D, predict_next_embed_with_action=False), "at least one predictor"),
    (lambda: LatentAutoregressive(_net(), dim=D, sigreg_loss_weight=1.5), "sigreg_loss_weight must lie in"),
    (lambda: LatentAutoregressive(_net(), dim=D, sigreg_loss_kwargs=dict(slices=3)), "sigreg_loss_kwargs"),
    (lambda: LatentAutoregressive(_net(), dim=D, pad_value=V), "pad_value must be a token id"),
    (lambda: LatentAutoregressive(nn.Linear(2, 2), dim=D), "net must be a TransformerWrapper"),
])
def test_bad_construction_is_a_one_line_error(make, match):
    with pytest.raises((ValueError, TypeError), match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_bad_calls_are_one_line_errors_before_any_work():
    model = LatentAutoregressive(_net(), dim=D)
    x = torch.randint(0, V, (2, 6))
    for call, match in ((lambda: model(x.float()), "x must be integer token ids"),
                        (lambda: model(x[:, :1]), r"x must be integer token ids \(b, n >= 2\)"),
                        (lambda: model(x + V), "ids outside"),
                        (lambda: model(x, return_embeddings=True), "return_embeddings is set by the wrapper")):
        with pytest.raises((ValueError, TypeError), match=match) as err:
            call()
        assert "\n" not in str(err.value)
    assert math.isfinite(model(x).item())
