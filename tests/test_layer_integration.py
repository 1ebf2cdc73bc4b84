"""LIMe (integrate_layers, 2502.09245) and q/k/v from different residual mixtures
(qkv_receive_diff_residuals): hyper.py's LayerIntegration and HyperResidual views."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder
from x_transformers.cache import KVCache
from x_transformers.hyper import HyperResidual, LayerIntegration
from x_transformers.norms import make_norm

DIM = 16


def _rms(dim):
    return lambda: make_norm("rmsnorm", dim)


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("views", [1, 3])
def test_integration_is_the_papers_weighted_sum(softmax, views):
    torch.manual_seed(0)
    lime = LayerIntegration(DIM, 4, views=views, use_softmax=softmax, make_norm=_rms(DIM))
    hs = [torch.randn(2, 5, DIM) for _ in range(4)]
    out = lime(hs[-1], hs)
    x = hs[-1]
    normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()  # rmsnorm, gain 1 at init
    logits = (normed @ lime.to_weights.weight.T + lime.to_weights.bias).view(2, 5, views, 4)
    w = logits.softmax(-1) if softmax else F.relu(logits)
    want = torch.stack([sum(w[..., v, l, None] * hs[l] for l in range(4)) for v in range(views)])
    torch.testing.assert_close(out, want[0] if views == 1 else want)
    if softmax:  # a convex mixture: weights sum to one over the layers
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 5, views))


def _pin_to_current_layer(model):
    """Weights that put all of every mixture on the block's own input: LIMe reads what the plain stack reads."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerIntegration):
                m.to_weights.weight.zero_()
                bias = torch.full((m.views, m.layers), -1e4)
                bias[:, -1] = 0.0
                m.to_weights.bias.copy_(bias.flatten())


@pytest.mark.parametrize("cls", [Decoder, Encoder])
def test_lime_reading_only_the_current_layer_is_the_plain_stack(cls):
    torch.manual_seed(0)
    lime = cls(dim=DIM, depth=3, heads=2, attn_dim_head=8, integrate_layers=True).eval()
    with torch.no_grad():  # branches far from GPT-2's small init, so that what they read shows
        for p in lime.parameters():
            p.mul_(4.0) if p.ndim == 2 else None
    plain = cls(dim=DIM, depth=3, heads=2, attn_dim_head=8).eval()
    missing, unexpected = plain.load_state_dict(lime.state_dict(), strict=False)
    assert not missing and all(".integrate." in k for k in unexpected)
    _pin_to_current_layer(lime)
    x = torch.randn(2, 7, DIM)
    torch.testing.assert_close(lime(x), plain(x))
    # and the mixture is read: other weights change the output
    with torch.no_grad():
        for m in lime.modules():
            if isinstance(m, LayerIntegration):
                m.to_weights.bias.zero_()
    assert not torch.allclose(lime(x), plain(x), atol=1e-3)


def test_lime_layout_counts_and_views():
    model = Decoder(dim=DIM, depth=2, heads=2, integrate_layers=True)
    lime = [b.integrate for b in model.blocks]
    # the first block's softmax over its one input is 1: no router there (see docs/migration.md, lime-first-block)
    assert lime[0] is None and [m.layers for m in lime[1:]] == [2, 3, 4]
    # the later self-attention reads three mixtures: q, k, v
    assert [m.views for m in lime[1:]] == [1, 3, 1]
    relu = Decoder(dim=DIM, depth=1, heads=2, integrate_layers=True, layer_integrate_use_softmax=False)
    assert not relu.blocks[0].integrate.use_softmax and relu.blocks[0].integrate.layers == 1


@pytest.mark.parametrize("kw", [dict(integrate_layers=True), dict(integrate_layers=True, num_residual_streams=2),
                                dict(integrate_layers=True, layer_integrate_use_softmax=False),
                                dict(num_residual_streams=2, qkv_receive_diff_residuals=True)])
def test_cached_decoding_equals_the_full_forward(kw):
    torch.manual_seed(0)
    model = Decoder(dim=DIM, depth=2, heads=2, attn_dim_head=8, **kw).eval()
    with torch.no_grad():  # away from init, so that the mixtures differ
        for name, p in model.named_parameters():
            if "integrate" in name or "alpha" in name:
                p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 6, DIM)
    full = model(x)
    cache = KVCache()
    steps = [model(x[:, :3], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_attention_reads_queries_keys_values_from_their_views():
    torch.manual_seed(0)
    model = Encoder(dim=DIM, depth=1, heads=2, attn_dim_head=8)
    attn = model.blocks[0].fn
    q_in, k_in, v_in = torch.randn(3, 2, 5, DIM).unbind(0)
    out, _ = attn(torch.stack((q_in, k_in, v_in)))

    def heads(t):
        return t.view(2, 5, 2, 8).transpose(1, 2)
    q, k, v = heads(attn.to_q(q_in)), heads(attn.to_k(k_in)), heads(attn.to_v(v_in))
    ref = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).softmax(-1) @ v
    torch.testing.assert_close(out, attn.to_out(ref.transpose(1, 2).reshape(2, 5, 16)), atol=1e-5, rtol=1e-5)
    # one view repeated three times is plain self-attention
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(attn(x.expand(3, -1, -1, -1))[0], attn(x)[0], atol=1e-6, rtol=1e-6)


def test_hyper_views_read_three_mixtures_that_start_equal():
    torch.manual_seed(0)
    model = Decoder(dim=DIM, depth=2, heads=2, num_residual_streams=3, qkv_receive_diff_residuals=True)
    a = model.blocks[2]
    assert isinstance(a, HyperResidual) and a.views == 3 and model.blocks[1].views == 1
    streams = torch.randn(2, 4, 3, DIM)
    h, _, _ = a.width(streams)
    assert h.shape == (3, 2, 4, DIM)
    # at init every view reads stream (layer index mod s) alike; moved apart, they differ
    torch.testing.assert_close(h[0], h[1]) and torch.testing.assert_close(h[1], h[2])
    with torch.no_grad():
        a.static_alpha[:, :3].copy_(torch.randn(3, 3))
    h, _, _ = a.width(streams)
    assert not torch.allclose(h[0], h[1]) and not torch.allclose(h[1], h[2])


@pytest.mark.parametrize("kw, match", [
    (dict(qkv_receive_diff_residuals=True), "needs hyper-connections"),
    (dict(integrate_layers=True, attn_shared_qk=True), "shared-QK"),
    (dict(integrate_layers=True, reversible=True), "run once"),
    (dict(layer_integrate_use_softmax=False), "integrate_layers"),
])
def test_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        Decoder(dim=DIM, depth=2, heads=2, **kw)


def test_aggregated_residuals_are_attention_over_the_block_inputs():
    from x_transformers.hyper import AttentionIntegration

    torch.manual_seed(0)
    agg = AttentionIntegration(DIM, 3, make_norm=_rms(DIM), lora_rank=4, lora_activation=torch.nn.functional.silu)
    with torch.no_grad():
        agg.up.weight.normal_()  # away from its zero init, so that the query's correction counts
    hs = [torch.randn(2, 5, DIM) for _ in range(3)]

    def rms(t):
        return t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    x = hs[-1]
    q = rms(x + agg.up(F.silu(agg.down(rms(x)))))
    w = torch.stack([(q * rms(h)).sum(-1) * DIM ** -0.5 for h in hs]).softmax(dim=0)  # (l, b, n)
    torch.testing.assert_close(agg(x, hs), sum(w[l, ..., None] * hs[l] for l in range(3)))
    # a convex mixture: equal inputs come back unchanged
    h = torch.randn(2, 5, DIM)
    torch.testing.assert_close(agg(h, [h, h, h]), h)


def test_aggregated_residuals_stack_layout_and_cache():
    torch.manual_seed(0)
    kw = dict(attn_aggregated_residuals=True, attn_aggregated_residual_kwargs=dict(lora_rank=4))
    model = Decoder(dim=DIM, depth=2, heads=2, attn_dim_head=8, **kw).eval()
    routers = [b.integrate for b in model.blocks]
    assert routers[0] is None and [r.layers for r in routers[1:]] == [2, 3, 4]  # (lime-first-block)
    with torch.no_grad():
        for r in routers[1:]:
            r.up.weight.normal_()
    x = torch.randn(2, 6, DIM)
    full = model(x)
    cache = KVCache()
    steps = [model(x[:, :2], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(attn_aggregated_residual_kwargs=dict(lora_rank=99)), "lora_rank"),
    (dict(attn_aggregated_residual_kwargs=dict(rank=4)), "unknown"),
    (dict(attn_aggregated_residual_kwargs=dict(lora_rank=4), gate_residual=True), "choose one"),
    (dict(attn_aggregated_residual_kwargs=dict(lora_rank=4), integrate_layers=True), "choose one"),
])
def test_aggregated_residual_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        Decoder(dim=DIM, depth=2, heads=2, attn_aggregated_residuals=True, **kw)


@pytest.mark.parametrize("kw", [dict(integrate_layers=True),
                                dict(attn_aggregated_residuals=True, attn_aggregated_residual_kwargs=dict(lora_rank=4))])
def test_layer_dropout_keeps_the_count_of_block_inputs(kw):
    """A dropped block's input is still one of the inputs later blocks mix (LIMe, aggregated
    residuals): with every draw dropping, the stack is its final norm of the input; with some dropped
    it runs; in eval it equals the same weights without layer dropout."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    model = Decoder(dim=32, depth=3, heads=4, layer_dropout=0.5, **kw)
    with mock.patch("torch.rand", lambda *a, **k: torch.zeros(())):  # every branch's draw drops it
        torch.testing.assert_close(model.train()(x), model.final_norm(x))
    for _ in range(8):
        assert torch.isfinite(model.train()(x)).all()
    plain = Decoder(dim=32, depth=3, heads=4, **kw)
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))
