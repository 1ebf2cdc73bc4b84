"""Residual branches: norm placement, ReZero, layer dropout."""

import torch
from torch import nn

from x_transformers import Decoder, Encoder
from x_transformers.norms import LayerNorm, RMSNorm, ScaleNorm
from x_transformers.residual import Residual

NORMS = (LayerNorm, RMSNorm, ScaleNorm)


def blocks(model):
    return [m for m in model.modules() if isinstance(m, Residual)]


def test_norm_placement_is_visible_in_repr_and_structure():
    pre, post, sandwich = (Encoder(dim=32, depth=2, heads=4, **kw)
                           for kw in ({}, dict(pre_norm=False), dict(sandwich_norm=True)))
    assert "placement=pre" in repr(pre) and "placement=post" in repr(post) and "placement=sandwich" in repr(sandwich)
    for b in blocks(pre):  # 1910.05895 pre-norm: x + f(norm(x)), one final norm
        assert b.pre_norm is not None and b.post_norm is None and b.branch_norm is None
    assert pre.final_norm is not None
    for b in blocks(post):  # post-norm: norm(x + f(x)), no final norm
        assert b.pre_norm is None and b.post_norm is not None and b.branch_norm is None
    assert post.final_norm is None
    for b in blocks(sandwich):  # 2105.13290: x + norm(f(norm(x)))
        assert b.pre_norm is not None and b.branch_norm is not None and b.post_norm is None


def test_post_norm_normalises_every_layer_output():
    model = Encoder(dim=32, depth=2, heads=4, pre_norm=False).eval()
    outs = []
    for b in blocks(model):
        b.register_forward_hook(lambda m, a, out: outs.append(out[0]))
    model(torch.randn(2, 6, 32) * 5)
    assert len(outs) == 4
    for o in outs:  # LayerNorm with weight 1, bias 0 at init: zero mean, unit variance per token
        torch.testing.assert_close(o.mean(-1), torch.zeros(o.shape[:-1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(o.var(-1, unbiased=False), torch.ones(o.shape[:-1]), atol=1e-3, rtol=0)


def test_rezero_is_identity_at_init_without_norms():
    # 2003.04887: x + g * f(x), g a learned scalar initialised to 0, no norms
    for cls, kw in ((Encoder, {}), (Decoder, dict(cross_attend=True))):
        model = cls(dim=32, depth=3, heads=4, use_rezero=True, **kw)
        assert not [m for m in model.modules() if isinstance(m, NORMS)]
        assert "placement=rezero" in repr(model)
        x = torch.randn(2, 6, 32)
        ctx = dict(context=torch.randn(2, 4, 32)) if kw else {}
        out = model(x, **ctx)
        assert torch.equal(out, x)  # every layer is exactly the identity
        out.square().sum().backward()
        gates = [b.gate for b in blocks(model)]
        assert all(g.shape == () for g in gates)
        assert all(g.grad is not None and g.grad.abs() > 0 for g in gates)  # the gates do learn


def test_layer_dropout_drops_whole_branches_in_training_only():
    torch.manual_seed(0)
    fn = nn.Linear(8, 8)
    block = Residual(fn, placement="rezero", make_norm=None, layer_dropout=0.5)
    with torch.no_grad():
        block.gate.fill_(1.0)
    x = torch.randn(2, 3, 8)
    full = x + fn(x)
    block.train()
    seen = set()
    for _ in range(40):
        out, _ = block(x)
        if torch.equal(out, x):
            seen.add("dropped")
        else:
            torch.testing.assert_close(out, full)  # all of the branch or none of it
            seen.add("kept")
    assert seen == {"dropped", "kept"}
    block.eval()
    for _ in range(5):
        torch.testing.assert_close(block(x)[0], full)


def test_layer_dropout_model_is_deterministic_in_eval():
    torch.manual_seed(0)
    model = Encoder(dim=32, depth=3, heads=4, layer_dropout=0.5)
    plain = Encoder(dim=32, depth=3, heads=4)
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 6, 32)
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))
    model.train()
    outs = [model(x) for _ in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
