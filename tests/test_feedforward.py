"""Feed-forward blocks: GLU variants (2002.05202), sizing, bias, dropout, chunking (Reformer)."""

import pytest
import torch
import torch.nn.functional as F

from x_transformers.config import FeedForwardConfig
from x_transformers.feedforward import FeedForward

GLU_VARIANTS = {  # 2002.05202: FFN_GLU-variant(x) = (x W * act(x V)) W2
    "gelu": F.gelu,  # GEGLU
    "swish": F.silu,  # SwiGLU
    "relu": F.relu,  # ReGLU
    "identity": lambda t: t,  # bilinear
}


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("act", list(GLU_VARIANTS))
def test_glu_variant_computes_value_times_activated_gate(act):
    torch.manual_seed(0)
    ff = FeedForward(16, FeedForwardConfig(glu=True, activation=act, mult=2))
    x = torch.randn(2, 5, 16)
    w, b = ff.proj_in.weight, ff.proj_in.bias
    inner = 32
    value = x @ w[:inner].T + b[:inner]
    gate = x @ w[inner:].T + b[inner:]
    ref = ff.proj_out(value * GLU_VARIANTS[act](gate))
    torch.testing.assert_close(ff(x), ref)


def test_glu_with_two_thirds_hidden_size_keeps_parameter_count():
    # the paper shrinks the GLU hidden size to 2/3 so the three matrices cost what two did:
    # ff_mult = 8/3 with ff_glu matches ff_mult = 4 without it
    dim = 48
    plain = FeedForward(dim, FeedForwardConfig(mult=4, no_bias=True))
    glu = FeedForward(dim, FeedForwardConfig(mult=8 / 3, glu=True, no_bias=True))
    assert count(glu) == count(plain) == 8 * dim * dim
    # at the same mult a GLU block has 1.5x the parameters
    same = FeedForward(dim, FeedForwardConfig(mult=4, glu=True, no_bias=True))
    assert count(same) == 12 * dim * dim


def test_mult_sets_hidden_size_and_no_bias_removes_biases():
    ff = FeedForward(16, FeedForwardConfig(mult=3))
    assert ff.proj_in.out_features == 48 and ff.proj_in.bias is not None
    nb = FeedForward(16, FeedForwardConfig(mult=3, no_bias=True))
    assert nb.proj_in.bias is None and nb.proj_out.bias is None
    assert count(ff) - count(nb) == 48 + 16


def test_ff_dropout_acts_in_training_only():
    torch.manual_seed(0)
    ff = FeedForward(16, FeedForwardConfig(dropout=0.5))
    ref = FeedForward(16, FeedForwardConfig())
    ref.load_state_dict(ff.state_dict())
    x = torch.randn(2, 5, 16)
    ff.eval()
    torch.testing.assert_close(ff(x), ref(x))
    ff.train()
    hidden = []
    ff.proj_out.register_forward_pre_hook(lambda m, a: hidden.append(a[0]))
    a, b = ff(x), ff(x)
    assert not torch.equal(a, b)
    kept = F.gelu(ff.proj_in(x))
    for h in hidden:  # each hidden unit is either zeroed or scaled by 1 / (1 - p)
        zero = h == 0
        assert zero.any() and (~zero).any()
        torch.testing.assert_close(h[~zero], 2 * kept[~zero])


def test_chunks_give_identical_output_with_smaller_hidden_activation():
    torch.manual_seed(0)
    one = FeedForward(16, FeedForwardConfig(glu=True))
    chunked = FeedForward(16, FeedForwardConfig(glu=True, chunks=3))
    chunked.load_state_dict(one.state_dict())
    x = torch.randn(2, 10, 16, requires_grad=True)
    rows = []
    chunked.proj_in.register_forward_hook(lambda m, a, out: rows.append(out.shape[-2]))
    out_one, out_chunked = one(x), chunked(x)
    torch.testing.assert_close(out_chunked, out_one, atol=1e-6, rtol=1e-6)
    assert max(rows) == 4 and len(rows) == 3  # ceil(10 / 3) tokens of hidden state at a time
    g1 = torch.autograd.grad(out_one.sum(), x)[0]
    g2 = torch.autograd.grad(out_chunked.sum(), x)[0]
    torch.testing.assert_close(g2, g1, atol=1e-6, rtol=1e-6)
