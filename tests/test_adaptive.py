"""Conditioned norms and branch gates (adaptive.py; DiT's adaLN / adaLN-Zero, 2212.09748): the
formulas against references computed here, identity at init, gradients to the condition (plain
and reversible), the condition through the wrappers and the KV cache, and the refusals."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers import ContinuousTransformerWrapper, CrossAttender, Decoder, Encoder, TransformerWrapper
from x_transformers.adaptive import AdaptiveLayerNorm, AdaptiveLayerScale, AdaptiveRMSNorm
from x_transformers.cache import KVCache

DIM, C = 16, 6


def _perturb(model):
    """Give every condition projection non-zero weights (they start at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "to_gamma" in name:
                p.add_(torch.randn_like(p) * 0.3)


def test_formulas():
    torch.manual_seed(0)
    x, c = torch.randn(2, 5, DIM), torch.randn(2, 5, C)  # a per-token condition
    ln, rms, gate = AdaptiveLayerNorm(DIM, C), AdaptiveRMSNorm(DIM, C), AdaptiveLayerScale(DIM, C)
    torch.testing.assert_close(ln(x, c), F.layer_norm(x, (DIM,)))  # identity at init: the plain norms
    torch.testing.assert_close(rms(x, c), x / x.pow(2).mean(-1, keepdim=True).sqrt())
    torch.testing.assert_close(gate(x, c), x * torch.sigmoid(torch.tensor(-2.0)))
    for m in (ln, rms, gate):
        _perturb(m)
    w = ln.to_gamma.weight
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x, c), (x - mu) / (var + 1e-5).sqrt() * (1 + c @ w.T), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rms(x, c), x / x.norm(dim=-1, keepdim=True) * DIM ** 0.5 * (1 + c @ rms.to_gamma.weight.T))
    torch.testing.assert_close(gate(x, c), x * torch.sigmoid(c @ gate.to_gamma.weight.T + gate.to_gamma.bias))


@pytest.mark.parametrize("adaptive, plain", [(dict(use_adaptive_layernorm=True), {}),
                                             (dict(use_adaptive_rmsnorm=True), dict(use_simple_rmsnorm=True, norm_eps=1e-12)),  # (F.normalize)
                                             (dict(use_adaptive_layerscale=True), dict(scale_residual=0.11920292202211755))])
def test_a_stack_at_init_is_the_unconditioned_one(adaptive, plain):
    """adaLN's gains start at 1 (W = 0); the adaLN-Zero gate at sigmoid(-2) on every branch."""
    torch.manual_seed(0)
    stack = Decoder(dim=DIM, depth=2, heads=2, attn_dim_head=8, dim_condition=C, adaptive_condition_mlp=True,
                    **adaptive).eval()
    ref = Decoder(dim=DIM, depth=2, heads=2, attn_dim_head=8, **plain).eval()
    missing = set(ref.load_state_dict(stack.state_dict(), strict=False).unexpected_keys)
    assert missing and all("to_gamma" in k or "conditioning" in k for k in missing)
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(stack(x, condition=torch.randn(2, C)), ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("reversible", [False, True])
def test_the_condition_steers_the_stack_and_gets_gradients(reversible):
    torch.manual_seed(0)
    stack = Encoder(dim=DIM, depth=2, heads=2, attn_dim_head=8, use_adaptive_layernorm=True, use_adaptive_layerscale=True,
                    dim_condition=C, adaptive_condition_mlp=True, adaptive_condition_mlp_expansion=2,
                    reversible=reversible)
    _perturb(stack)
    assert stack.conditioning.mlp[0].weight.shape == (2 * C, C)
    x, c = torch.randn(2, 5, DIM), torch.randn(2, C, requires_grad=True)
    out = stack(x, condition=c)
    assert not torch.allclose(out, stack(x, condition=c + 1))
    out.square().sum().backward()
    grads = {n: p.grad for n, p in stack.named_parameters() if "to_gamma" in n or "conditioning" in n}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()) and c.grad.abs().sum() > 0
    if reversible:  # the recomputing Function against ordinary autograd (return_attn takes that path)
        c2 = c.detach().clone().requires_grad_()
        stack.zero_grad()
        stack(x, condition=c2, return_attn=True)[0].square().sum().backward()
        torch.testing.assert_close(c2.grad, c.grad, atol=1e-5, rtol=1e-4)


def test_condition_through_wrappers_and_the_cache():
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, num_memory_tokens=2, attn_layers=Decoder(
        dim=DIM, depth=2, heads=2, attn_dim_head=8, use_adaptive_rmsnorm=True, use_adaptive_layerscale=True,
        dim_condition=C)).eval()
    _perturb(net)
    x, c = torch.randint(0, 20, (2, 7)), torch.randn(2, C)
    full = net(x, condition=c)
    cache = KVCache()
    steps = [net(x[:, :3], cache=cache, condition=c)] + [net(x[:, t:t + 1], cache=cache, condition=c) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    cont = ContinuousTransformerWrapper(dim_in=3, dim_out=3, max_seq_len=8, attn_layers=CrossAttender(
        dim=DIM, depth=1, heads=2, attn_dim_head=8, use_adaptive_layernorm=True, dim_condition=C))
    _perturb(cont)
    v, ctx = torch.randn(2, 4, 3), torch.randn(2, 3, DIM)
    assert not torch.allclose(cont(v, context=ctx, condition=c), cont(v, context=ctx, condition=-c))


def test_condition_errors_name_the_keyword():
    stack = Decoder(dim=DIM, depth=1, heads=2, use_adaptive_layernorm=True, dim_condition=C)
    x = torch.randn(2, 4, DIM)
    with pytest.raises(ValueError, match="pass condition="):
        stack(x)
    with pytest.raises(ValueError, match=r"condition must be .*\(2, 6\)"):
        stack(x, condition=torch.randn(2, C + 1))
    with pytest.raises(ValueError, match="no adaptive norm"):
        Decoder(dim=DIM, depth=1, heads=2)(x, condition=torch.randn(2, C))
    with pytest.raises(ValueError, match="dim_condition configures"):
        Decoder(dim=DIM, depth=1, heads=2, dim_condition=C)


def test_generate_and_the_loss_take_the_condition():
    from x_transformers import AutoregressiveWrapper

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=DIM, depth=1, heads=2, attn_dim_head=8, use_adaptive_layernorm=True, dim_condition=C))
    _perturb(net)
    ar = AutoregressiveWrapper(net)
    prompts, c = torch.randint(0, 20, (2, 3)), torch.randn(2, C)
    cached = ar.generate(prompts, 5, temperature=0.0, condition=c)
    assert torch.equal(cached, ar.generate(prompts, 5, temperature=0.0, condition=c, cache_kv=False))
    beams = ar.generate(prompts, 4, beams=2, condition=c)
    assert torch.equal(beams, ar.generate(prompts, 4, beams=2, condition=c, cache_kv=False))
    ar(torch.randint(0, 20, (2, 6)), condition=c).backward()
    assert net.attn_layers.final_norm.to_gamma.weight.grad.abs().sum() > 0
