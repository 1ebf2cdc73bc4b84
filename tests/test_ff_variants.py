"""Feed-forward variants from upstream (issue 21): each ``ff_*`` keyword's formula, written out by
hand, against the block a stack builds."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from x_transformers import Decoder, Encoder
from x_transformers.config import ConfigConflictError, FeedForwardConfig
from x_transformers.feedforward import FeedForward

DIM = 16


def ff_of(**kw):
    """The first feed-forward block of a small Encoder built with ``kw``, in float64."""
    torch.manual_seed(0)
    model = Encoder(dim=DIM, depth=2, heads=2, **kw).double().eval()
    return next(b.fn for b in model.blocks if isinstance(b.fn, FeedForward)), model


def x_in():
    torch.manual_seed(1)
    return torch.randn(2, 5, DIM, dtype=torch.float64) * 2


def ln(h):
    return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)


def sc(h, v):
    return v * torch.tanh(h / v)


def test_solu_is_layernorm_of_x_times_softmax_x():
    ff, _ = ff_of(ff_solu=True)
    x = x_in()
    h = x @ ff.proj_in.weight.T + ff.proj_in.bias
    expected = ln(h * torch.softmax(h, dim=-1)) @ ff.proj_out.weight.T + ff.proj_out.bias
    torch.testing.assert_close(ff(x), expected)


def test_post_act_ln_normalises_the_hidden_activation():
    ff, _ = ff_of(ff_post_act_ln=True)
    x = x_in()
    h = F.gelu(x @ ff.proj_in.weight.T + ff.proj_in.bias)
    torch.testing.assert_close(ff(x), ln(h) @ ff.proj_out.weight.T + ff.proj_out.bias)


def test_glu_mult_bias_is_a_learned_gain_on_the_glu_output():
    ff, _ = ff_of(ff_glu=True, ff_glu_mult_bias=True)
    assert torch.all(ff.mult_bias == 1) and ff.mult_bias.shape == (4 * DIM,)
    with torch.no_grad():
        ff.mult_bias.copy_(torch.linspace(-2, 2, 4 * DIM))
    x = x_in()
    up, gate = (x @ ff.proj_in.weight.T + ff.proj_in.bias).chunk(2, dim=-1)
    expected = (up * F.gelu(gate) * ff.mult_bias) @ ff.proj_out.weight.T + ff.proj_out.bias
    torch.testing.assert_close(ff(x), expected)


class LeakyGain(nn.Module):
    """max(h, 0.3 h) times a learned per-channel gain: an activation with parameters."""

    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))

    def forward(self, h):
        return torch.where(h > 0, h, 0.3 * h) * self.gain


def test_custom_activation_replaces_the_activation_and_is_copied_per_block():
    act = LeakyGain(4 * DIM)
    _, model = ff_of(ff_custom_activation=act)
    ffs = [b.fn for b in model.blocks if isinstance(b.fn, FeedForward)]
    assert ffs[0].act is not ffs[1].act and ffs[0].act is not act  # each block owns its parameters
    ff, x = ffs[0], x_in()
    h = x @ ff.proj_in.weight.T + ff.proj_in.bias
    expected = torch.where(h > 0, h, 0.3 * h) @ ff.proj_out.weight.T + ff.proj_out.bias
    torch.testing.assert_close(ff(x), expected)
    _, plain = ff_of(ff_custom_activation=torch.sigmoid)  # a plain callable works too
    ff = next(b.fn for b in plain.blocks if isinstance(b.fn, FeedForward))
    h = x @ ff.proj_in.weight.T + ff.proj_in.bias
    torch.testing.assert_close(ff(x), torch.sigmoid(h) @ ff.proj_out.weight.T + ff.proj_out.bias)


def test_softclamp_value_bounds_the_first_projection_before_the_activation():
    ff, _ = ff_of(ff_softclamp_value=0.5)
    x = x_in()
    h = sc(x @ ff.proj_in.weight.T + ff.proj_in.bias, 0.5)
    torch.testing.assert_close(ff(x), F.gelu(h) @ ff.proj_out.weight.T + ff.proj_out.bias)


@pytest.mark.parametrize("act", ["gelu", "swish"])
def test_glu_softclamp_is_situ_glu(act):
    # SiTU-GLU (2607.24653): sc(up, b_u) * sc(gate, b_g) * Phi(gate) (GELU) or * sigmoid(gate) (swish)
    ff, _ = ff_of(ff_glu=True, ff_activation=act, ff_glu_softclamp=True, ff_glu_gate_softclamp_value=0.7,
                  ff_glu_up_softclamp_value=1.5)
    x = x_in() * 5
    up, gate = (x @ ff.proj_in.weight.T + ff.proj_in.bias).chunk(2, dim=-1)
    nonlin = torch.special.ndtr(gate) if act == "gelu" else torch.sigmoid(gate)
    hidden = sc(up, 1.5) * sc(gate, 0.7) * nonlin
    torch.testing.assert_close(ff(x), hidden @ ff.proj_out.weight.T + ff.proj_out.bias)
    assert hidden.abs().max() <= 1.5 * 0.7


def test_a_glu_clamp_value_asks_for_the_clamp():
    # upstream's test gives ff_glu_gate_softclamp_value alone: here it switches SiTU-GLU on
    cfg = FeedForwardConfig(glu=True, glu_gate_softclamp_value=10.0)
    assert cfg.glu_softclamp_on
    with pytest.raises(ValueError, match="ff_glu_up_softclamp_value.*ff_glu=True"):
        FeedForwardConfig(glu_up_softclamp_value=3.0)
    with pytest.raises(ValueError, match="GELU or swish"):
        FeedForwardConfig(glu=True, glu_softclamp=True, activation="relu")
    with pytest.raises(ValueError, match="ff_glu_mult_bias"):
        FeedForwardConfig(glu_mult_bias=True)


def test_zero_init_output_starts_the_block_at_zero():
    ff, model = ff_of(ff_zero_init_output=True)
    assert not ff.proj_out.weight.any() and not ff.proj_out.bias.any()
    assert not ff(x_in()).any()


def test_output_proj_depth_is_olmos_depth_scaled_init():
    torch.manual_seed(0)
    model = Encoder(dim=256, depth=1, heads=4, ff_output_proj_depth=3)
    w = model.blocks[1].fn.proj_out.weight
    expected = (2 * w.shape[1] * 3) ** -0.5
    assert abs(w.std().item() / expected - 1) < 0.03


def test_sublayer_dropout_drops_output_channels_in_training_only():
    ff, _ = ff_of(ff_sublayer_dropout=0.5)
    x = x_in()[:1].expand(64, 5, DIM)
    assert torch.equal(ff(x), ff(x))  # eval: no dropout
    ff.train()
    torch.manual_seed(3)
    out, full = ff(x), ff.eval()(x)
    kept = out != 0
    assert 0.4 < 1 - kept.double().mean() < 0.6
    torch.testing.assert_close(out[kept], 2 * full[kept])


def test_dim_out_sizes_the_output_and_a_stack_refuses_another_width():
    ff = FeedForward(DIM, FeedForwardConfig(dim_out=7))
    assert ff(torch.randn(2, 3, DIM)).shape == (2, 3, 7)
    with pytest.raises(ValueError, match="ff_dim_out"):
        Decoder(dim=DIM, depth=1, heads=2, ff_dim_out=7)
    Decoder(dim=DIM, depth=1, heads=2, ff_dim_out=DIM)


@pytest.mark.parametrize("kw", [dict(ff_solu=True, ff_activation="relu"),
                                dict(ff_custom_activation=torch.tanh, ff_solu=True),
                                dict(ff_zero_init_output=True, ff_output_proj_depth=2),
                                dict(ff_glu=True, ff_glu_softclamp=True, ff_solu=True)])
def test_conflicting_feed_forward_keywords_are_refused_naming_both(kw):
    with pytest.raises(ConfigConflictError) as err:
        Decoder(dim=DIM, depth=1, heads=2, **kw)
    names = [k for k in kw if k != "ff_glu"]
    assert all(n in str(err.value) for n in names)


def test_chunked_feed_forward_with_every_option_equals_unchunked():
    kw = dict(ff_glu=True, ff_glu_mult_bias=True, ff_post_act_ln=True, ff_glu_softclamp=True, ff_softclamp_value=3.0)
    ff, _ = ff_of(**kw)
    chunked, _ = ff_of(ff_chunks=3, **kw)
    chunked.load_state_dict(ff.state_dict())
    x = x_in()
    torch.testing.assert_close(chunked(x), ff(x))
