"""Gates and scales around attention's output (gating.py, issue 20): each against its formula,
written out here over the heads' output o, on an Attention whose output projection is removed
(attn_project_out=False, so the block's output is o after the gates), and every model kind."""

import pytest
import torch
import torch.nn.functional as F

from attention_helpers import assert_cache_decoding_equals_full_forward

from x_transformers import CrossAttender, Decoder, Encoder, FunnelEncoder, TransformerWrapper, XTransformer
from x_transformers.config import ConfigConflictError
from x_transformers.x_transformers import Attention

DIM, HEADS, D = 32, 4, 8  # heads * D == DIM: no output projection needed


def bare(seed=0, **kw):
    """An Attention with no output projection: its output is the (gated) heads' output."""
    torch.manual_seed(seed)
    return Attention(DIM, dim_head=D, heads=HEADS, causal=True, project_out=False, **kw)


def heads_output(attn, x):
    """o (b, n, h*D): the plain attention of attn's own projections, written out here."""
    b, n, _ = x.shape
    q, k, v = (p(x).view(b, n, HEADS, D).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    scores = (q @ k.transpose(-1, -2)) * D ** -0.5
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)


def per_head(t):  # (b, n, h) -> (b, n, h*D): one logit per head over its D channels
    return t.repeat_interleave(D, dim=-1)


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


X = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(3))


def test_project_out_false_is_the_heads_output():
    attn = bare()
    torch.testing.assert_close(attn(X), heads_output(attn, X), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_project_out=False"):
        Attention(DIM, dim_head=16, heads=HEADS, project_out=False)


@pytest.mark.parametrize("swiglu", [False, True])
def test_input_gate_per_channel(swiglu):
    attn = bare(gate_values=True, swiglu_values=swiglu)
    act = F.silu if swiglu else torch.sigmoid
    o = heads_output(attn, X)
    # at init the logits are zero: the gate is sigmoid(0) = 1/2, or SiLU(0) = 0
    torch.testing.assert_close(attn(X), o * (0.0 if swiglu else 0.5), atol=1e-6, rtol=1e-5)
    randomise(attn.gates)
    w = attn.gates.input_gate.weight
    torch.testing.assert_close(attn(X), o * act(X @ w.T), atol=1e-5, rtol=1e-5)


def test_input_gate_headwise_and_low_rank():
    attn = bare(gate_values=True, gate_values_headwise=True)
    randomise(attn.gates)
    o = heads_output(attn, X)
    w = attn.gates.input_gate.weight  # (h, dim)
    assert w.shape == (HEADS, DIM)
    torch.testing.assert_close(attn(X), o * torch.sigmoid(per_head(X @ w.T)), atol=1e-5, rtol=1e-5)
    for silu in (True, False):
        attn = bare(gate_values=True, gate_values_rank=3, low_rank_silu_gates=silu)
        gate = attn.gates.input_gate
        assert not gate.up.weight.any()  # zero at init: the gate starts at 1/2
        randomise(attn.gates)
        h = X @ gate.down.weight.T
        logits = (F.silu(h) if silu else h) @ gate.up.weight.T
        torch.testing.assert_close(attn(X), heads_output(attn, X) * torch.sigmoid(logits), atol=1e-5, rtol=1e-5)


def test_input_and_output_gates_sum_their_logits():
    attn = bare(gate_values=True, output_gate=True, output_gate_headwise=True)
    randomise(attn.gates)
    o = heads_output(attn, X)
    wx, wo = attn.gates.input_gate.weight, attn.gates.output_gate.weight  # (h*D, dim), (h, h*D)
    expect = o * torch.sigmoid(X @ wx.T + per_head(o @ wo.T))
    torch.testing.assert_close(attn(X), expect, atol=1e-5, rtol=1e-5)


def test_value_head_gate_opens_at_init_and_gates_each_head():
    attn = bare(gate_value_heads=True)
    o = heads_output(attn, X)
    torch.testing.assert_close(attn(X), o * torch.sigmoid(torch.tensor(10.0)), atol=1e-6, rtol=1e-6)
    randomise(attn.value_head_gate)
    lin = attn.value_head_gate.proj
    torch.testing.assert_close(attn(X), o * torch.sigmoid(per_head(lin(X))), atol=1e-5, rtol=1e-5)


def test_head_scale_multiplies_each_head():
    attn = bare(head_scale=True)
    o = heads_output(attn, X)
    torch.testing.assert_close(attn(X), o, atol=1e-6, rtol=1e-6)  # ones at init
    with torch.no_grad():
        attn.head_scale.scale.copy_(torch.tensor([0.0, 1.0, 2.0, -1.0]).view(HEADS, 1, 1))
    scale = per_head(torch.tensor([0.0, 1.0, 2.0, -1.0]).view(1, 1, HEADS))
    torch.testing.assert_close(attn(X), o * scale, atol=1e-5, rtol=1e-5)


def test_attention_on_attention_is_a_glu_of_the_heads_output():
    torch.manual_seed(0)
    attn = Attention(DIM, dim_head=D, heads=HEADS, causal=True, on_attn=True)
    lin = attn.to_out[0]
    assert lin.weight.shape == (2 * DIM, HEADS * D)
    attn.to_out = torch.nn.Sequential(torch.nn.Identity())  # read o itself, then apply the GLU by hand
    o = attn(X)
    attn.to_out = torch.nn.Sequential(lin, torch.nn.GLU())
    a, g = (o @ lin.weight.T).chunk(2, dim=-1)
    torch.testing.assert_close(attn(X), a * torch.sigmoid(g), atol=1e-5, rtol=1e-5)


def test_zero_init_output_survives_the_stack_init_and_gives_zero():
    layers = Decoder(dim=DIM, depth=2, heads=HEADS, attn_zero_init_output=True)
    outs = [b.fn.to_out.weight for b in layers.blocks if hasattr(b.fn, "to_q")]
    assert outs and all(not w.any() for w in outs)
    attn = next(b.fn for b in layers.blocks if hasattr(b.fn, "to_q"))
    out, _ = attn(X)
    assert not out.any()


def test_output_proj_depth_scales_the_init():
    layers = Decoder(dim=256, depth=1, heads=8, attn_output_proj_depth=4)
    w = next(b.fn.to_out.weight for b in layers.blocks if hasattr(b.fn, "to_q"))
    expect = (2 * w.shape[1] * 4) ** -0.5
    assert abs(w.std().item() / expect - 1) < 0.03


def test_sublayer_dropout_drops_the_block_output_in_training_only():
    torch.manual_seed(0)
    attn = Attention(DIM, dim_head=D, heads=HEADS, sublayer_dropout=0.25)
    x = torch.randn(4, 64, DIM)
    attn.eval()
    ref = attn(x)
    attn.train()
    out = attn(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    torch.testing.assert_close(out[~dropped], ref[~dropped] / 0.75, atol=1e-5, rtol=1e-5)


def test_dim_out_standalone_and_refused_in_a_stack():
    attn = Attention(DIM, dim_head=D, heads=HEADS, dim_out=12)
    assert attn(X).shape == (2, 7, 12)
    with pytest.raises(ConfigConflictError, match="attn_dim_out"):
        Decoder(dim=DIM, depth=1, attn_dim_out=12)


def test_settings_that_configure_nothing_are_refused():
    for kw, words in ((dict(attn_gate_values_rank=4), "configures attn_gate_values"),
                      (dict(attn_output_gate_headwise=True), "configures attn_output_gate"),
                      (dict(attn_swiglu_values=True), "attn_swiglu_values"),
                      (dict(attn_gate_values=True, attn_gate_values_rank=4, attn_gate_values_headwise=True), "headwise"),
                      (dict(attn_gate_values=True, attn_low_rank_silu_gates=False), "low-rank"),
                      (dict(attn_on_attn=True, attn_project_out=False), "attn_project_out")):
        with pytest.raises(ValueError, match=words):
            Decoder(dim=DIM, depth=1, **kw)


GATING = {
    "gates": dict(attn_gate_values=True, attn_gate_values_rank=4, attn_output_gate=True, attn_swiglu_values=True),
    "headwise": dict(attn_gate_values=True, attn_gate_values_headwise=True, attn_output_gate=True,
                     attn_output_gate_headwise=True),
    "value_heads": dict(attn_gate_value_heads=True, attn_head_scale=True),
    "on_attn": dict(attn_on_attn=True, attn_sublayer_dropout=0.1),
    "no_projection": dict(attn_project_out=False, attn_dim_head=8),
}


@pytest.mark.parametrize("name", sorted(GATING))
def test_cache_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=32,
                             attn_layers=Decoder(dim=DIM, depth=2, heads=HEADS, rotary_pos_emb=True, **GATING[name]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "gate" in n:
                p.normal_(0, 0.3)  # gates away from their init, so each one shapes the output
    assert_cache_decoding_equals_full_forward(net)


@pytest.mark.parametrize("name", sorted(GATING))
def test_every_model_kind_accepts(name):
    kw = dict(GATING[name])
    x = torch.randn(2, 6, DIM)
    assert torch.isfinite(Encoder(dim=DIM, depth=1, heads=HEADS, **kw)(x)).all()
    assert torch.isfinite(CrossAttender(dim=DIM, depth=1, heads=HEADS, **kw)(x, context=torch.randn(2, 5, DIM))).all()
    assert torch.isfinite(FunnelEncoder(dim=DIM, depths=(1, 1), heads=HEADS, **kw)(x)).all()
    side = {f"{s}_{k}": v for k, v in kw.items() for s in ("enc", "dec")}
    xt = XTransformer(dim=DIM, enc_num_tokens=20, enc_depth=1, enc_heads=HEADS, enc_max_seq_len=16, dec_num_tokens=20,
                      dec_depth=1, dec_heads=HEADS, dec_max_seq_len=16, **side)
    t = torch.randint(0, 20, (2, 6))
    assert torch.isfinite(xt(t, t)).all()


def test_gates_reach_cross_attention():
    # upstream: every attn_ keyword reaches self- and cross-attention alike
    layers = Decoder(dim=DIM, depth=1, heads=HEADS, cross_attend=True, attn_gate_values=True, attn_head_scale=True)
    kinds = {s.kind: b.fn for s, b in zip(layers.layout, layers.blocks) if s.kind in "ac"}
    for attn in (kinds["a"], kinds["c"]):
        assert attn.gates is not None and attn.head_scale is not None
