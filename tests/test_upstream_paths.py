"""Upstream's module paths (x_transformers.x_transformers, .autoregressive_wrapper) and the two
small upstream modules built on our layers (NeoMLP, MultiInputTransformerWrapper)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from x_transformers import Decoder, Encoder, TransformerWrapper, sampling
from x_transformers import autoregressive, layers, wrappers
from x_transformers.multi_input import MultiInputTransformerWrapper
from x_transformers.neo_mlp import NeoMLP


def test_upstream_test_file_imports_resolve_to_our_classes():
    # the names upstream's own test file imports at its top
    from x_transformers.x_transformers import (Attend, Attention, AttentionLayers, Decoder as D, Encoder as E,
                                               LinearNoBias, TransformerWrapper as TW, XTransformer)
    from x_transformers.autoregressive_wrapper import AutoregressiveWrapper

    assert (D, E, TW, AttentionLayers, XTransformer) == (layers.Decoder, layers.Encoder, wrappers.TransformerWrapper,
                                                        layers.AttentionLayers, wrappers.XTransformer)
    assert AutoregressiveWrapper is autoregressive.AutoregressiveWrapper
    assert LinearNoBias(4, 3).bias is None
    assert Attend is not None and Attention is not None


def test_names_we_lack_are_absent():
    import x_transformers.x_transformers as xt

    for name in ("AttentionPool", "LayerIntermediates"):
        assert not hasattr(xt, name)
    assert xt.PrefixDecoder is layers.PrefixDecoder


def _manual_attention(x, attn, mask=None, causal=False, kv=None):
    """softmax(q k^T / sqrt(d)) v through the module's own projections, computed by hand."""
    b, n, _ = x.shape
    src = x if kv is None else kv
    h, g, d = attn.heads, attn.kv_heads, attn.dim_head
    q = attn.to_q(x).view(b, n, h, d).transpose(1, 2)
    k = attn.to_k(src).view(b, -1, g, d).transpose(1, 2).repeat_interleave(h // g, dim=1)
    v = attn.to_v(src).view(b, -1, g, d).transpose(1, 2).repeat_interleave(h // g, dim=1)
    s = q @ k.transpose(-1, -2) * d ** -0.5
    keep = torch.ones_like(s, dtype=torch.bool)
    if causal:
        keep &= torch.ones(n, src.shape[1], dtype=torch.bool).tril()
    if mask is not None:
        keep &= mask[:, None, None, :]
    out = s.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    return attn.to_out(out.transpose(1, 2).reshape(b, n, h * d))


def test_attention_takes_upstream_keywords_and_matches_a_manual_computation():
    from x_transformers.x_transformers import Attention

    torch.manual_seed(0)
    attn = Attention(32, dim_head=8, heads=4, causal=True, one_kv_head=True).eval()
    assert attn.to_k.out_features == 8  # one kv head
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = attn(x, mask=mask)
    torch.testing.assert_close(out, _manual_attention(x, attn, mask, causal=True), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one_kv_head=True is kv_heads=1"):
        Attention(32, heads=4, one_kv_head=True, kv_heads=2)
    with pytest.raises(TypeError, match="unknown keyword"):
        Attention(32, heads=4, qk_nrom=True)


def test_cross_attention_reads_the_context_and_its_mask():
    from x_transformers.x_transformers import Attention

    torch.manual_seed(1)
    attn = Attention(32, dim_head=8, heads=4, dim_context=16).eval()
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 5, 16)
    cmask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = attn(x, context=ctx, context_mask=cmask)
    torch.testing.assert_close(out, _manual_attention(x, attn, cmask, kv=ctx), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pass context"):
        attn(x)


def test_feedforward_takes_upstream_keywords():
    from x_transformers.x_transformers import FeedForward

    torch.manual_seed(2)
    ff = FeedForward(16, glu=True, swish=True, mult=2)
    x = torch.randn(3, 16)
    up, gate = ff.proj_in(x).chunk(2, dim=-1)
    torch.testing.assert_close(ff(x), ff.proj_out(up * F.silu(gate)))
    plain = FeedForward(16, relu_squared=True, no_bias=True)
    assert plain.proj_in.bias is None
    torch.testing.assert_close(plain(x), plain.proj_out(F.relu(plain.proj_in(x)) ** 2))
    with pytest.raises(ValueError, match="choose one activation"):
        FeedForward(16, swish=True, relu_squared=True)


def test_feedforward_takes_upstreams_newer_keywords():
    from x_transformers.x_transformers import FeedForward

    torch.manual_seed(2)
    x = torch.randn(3, 16)
    solu = FeedForward(16, solu=True, mult=2)
    h = solu.proj_in(x)
    torch.testing.assert_close(solu(x), solu.proj_out(F.layer_norm(h * h.softmax(-1), (32,))), atol=1e-5, rtol=1e-5)
    zero = FeedForward(16, zero_init_output=True, post_act_ln=True, sublayer_dropout=0.1)
    assert zero(x).abs().max() == 0  # the output projection starts at zero
    deep = FeedForward(16, output_proj_depth=4)  # OLMo's init: std (2 * inner * depth) ** -0.5
    assert abs(deep.proj_out.weight.std().item() - (2 * 64 * 4) ** -0.5) < 0.01
    with pytest.raises(TypeError, match="unexpected keyword"):
        FeedForward(16, glu_mult=True)


def test_attend_matches_softmax_attention_and_respects_masks():
    from x_transformers.x_transformers import Attend

    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    bias = torch.randn(4, 5, 7)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    out, inter = Attend(causal=True)(q, k, v, mask=mask, attn_bias=bias, return_attn=True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-1, -2) * 8 ** -0.5 + bias
    keep = mask[:, None, None, :] & torch.ones(5, 7, dtype=torch.bool).tril(diagonal=2)  # bottom-right causal
    ref_w = s.masked_fill(~keep, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, ref_w @ vv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter.post_softmax_attn, ref_w, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="built for 3 heads"):
        Attend(heads=3)(q, k, v)


def test_upstream_filter_signatures_call_ours():
    from x_transformers.autoregressive_wrapper import min_p, top_k, top_p

    torch.manual_seed(4)
    logits = torch.randn(3, 40)
    assert torch.equal(top_k(logits, 0.25), sampling.top_k(logits, frac=0.25))  # upstream's positional order
    assert torch.equal(top_k(logits, k=3), sampling.top_k(logits, k=3))
    assert torch.equal(top_p(logits, thres=0.5), sampling.top_p(logits, p=0.5))
    assert torch.equal(min_p(logits, min_p=0.2), sampling.min_p(logits, p=0.2))
    assert (top_k(logits, k=3).isfinite().sum(-1) == 3).all()


# ---------------------------------------------------------------------------------- NeoMLP


def _neo(**kw):
    torch.manual_seed(5)
    return NeoMLP(dim_in=5, dim_out=7, dim_hidden=6, depth=2, dim_model=32,
                  encoder_kwargs=dict(heads=4, attn_dim_head=8), **kw)


def test_neo_mlp_is_the_encoder_over_unit_tokens():
    mlp = _neo().eval()
    x = torch.randn(3, 5)
    out, (inp, hid, outp) = mlp(x, return_embeds=True)
    assert out.shape == (3, 7) and (inp.shape, hid.shape, outp.shape) == ((3, 5, 32), (3, 6, 32), (3, 7, 32))
    # the same computation composed by hand from its parts
    fourier = torch.cos(2 * torch.pi * (x[..., None] * mlp.fourier.weight + mlp.fourier.bias))
    tokens = torch.cat((mlp.fourier_proj(fourier) + mlp.input_embed, mlp.hidden_embed.expand(3, -1, -1),
                        mlp.output_embed.expand(3, -1, -1)), dim=1)
    states = mlp.transformer(tokens)
    ref = torch.einsum("bod,od->bo", states[:, -7:], mlp.to_output_weights) + mlp.to_output_bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp(x[1]), out[1], atol=1e-5, rtol=1e-5)  # unbatched input


def test_neo_mlp_gradients_reach_every_embedding_and_every_input_reaches_every_output():
    mlp = _neo()
    x = torch.randn(3, 5, requires_grad=True)
    mlp(x).square().sum().backward()
    for name, p in mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the random Fourier projection is fixed: buffers, saved with the model, never trained
    assert {"fourier.weight", "fourier.bias"} <= set(mlp.state_dict()) and not any(
        n.startswith("fourier.") for n, _ in mlp.named_parameters())
    jac = torch.autograd.functional.jacobian(lambda v: _neo().eval()(v), torch.randn(5))  # (7, 5)
    assert (jac.abs() > 0).all()  # a dense layer: every output depends on every input


def test_neo_mlp_refuses_bad_input():
    with pytest.raises(ValueError, match=r"expects \(batch, 5\)"):
        _neo()(torch.randn(3, 4))
    with pytest.raises(ValueError, match="dim_hidden must be an integer >= 1"):
        NeoMLP(dim_in=5, dim_out=7, dim_hidden=0, depth=2, dim_model=32)


# ------------------------------------------------------------------ MultiInputTransformerWrapper


def test_one_stream_is_a_transformer_wrapper():
    torch.manual_seed(6)
    stack = Decoder(dim=32, depth=2, heads=4)
    multi = MultiInputTransformerWrapper(num_tokens=dict(note=50), max_seq_len=16, attn_layers=stack,
                                         num_memory_tokens=2).eval()
    single = TransformerWrapper(num_tokens=50, max_seq_len=16, attn_layers=stack, num_memory_tokens=2).eval()
    single.token_emb.weight.data.copy_(multi.embeds["note"].weight)
    single.pos_emb.emb.weight.data.copy_(multi.pos_emb.emb.weight)
    single.memory_tokens.data.copy_(multi.memory_tokens)
    single.to_logits.weight.data.copy_(multi.to_logits["note"].weight)
    x = torch.randint(0, 50, (2, 9))
    mask = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
    torch.testing.assert_close(multi(dict(note=x), mask)["note"], single(x, mask), atol=1e-5, rtol=1e-5)


def test_streams_are_summed_and_each_has_its_head():
    torch.manual_seed(7)
    multi = MultiInputTransformerWrapper(num_tokens=dict(note=50, pitch=12, tone=4), max_seq_len=16,
                                         attn_layers=Encoder(dim=32, depth=1, heads=4)).eval()
    x = dict(note=torch.randint(0, 50, (2, 8)), pitch=torch.randint(0, 12, (2, 8)), tone=torch.randint(0, 4, (2, 8)))
    out = multi(x)
    h = sum(multi.embeds[k](v) for k, v in x.items()) + multi.pos_emb(torch.arange(8)[None])
    hidden = multi.attn_layers(h)
    for name, size in multi.num_tokens.items():
        assert out[name].shape == (2, 8, size)
        torch.testing.assert_close(out[name], multi.to_logits[name](hidden), atol=1e-5, rtol=1e-5)
    # gradients reach every stream's embedding table
    sum(o.sum() for o in multi(x).values()).backward()
    for name, emb in multi.embeds.items():
        assert emb.weight.grad.abs().sum() > 0, name


def test_masked_tokens_change_nothing_that_is_kept():
    torch.manual_seed(8)
    multi = MultiInputTransformerWrapper(num_tokens=dict(a=20, b=6), max_seq_len=16, return_only_embed=True,
                                         attn_layers=Encoder(dim=32, depth=2, heads=4)).eval()
    x = dict(a=torch.randint(0, 20, (2, 7)), b=torch.randint(0, 6, (2, 7)))
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    y = {k: v.clone() for k, v in x.items()}
    y["a"][1, 4:] = (y["a"][1, 4:] + 1) % 20
    y["b"][1, 4:] = (y["b"][1, 4:] + 1) % 6
    out_x, out_y = multi(x, mask), multi(y, mask)
    assert out_x.shape == (2, 7, 32)
    torch.testing.assert_close(out_x[mask], out_y[mask])
    assert not torch.allclose(multi(x), multi(y))  # without the mask they do matter


def test_multi_input_refuses_bad_input():
    multi = MultiInputTransformerWrapper(num_tokens=dict(a=20, b=6), max_seq_len=16,
                                         attn_layers=Encoder(dim=32, depth=1, heads=4))
    with pytest.raises(ValueError, match=r"keys \['a', 'b'\]"):
        multi(dict(a=torch.zeros(1, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"input 'b' has ids outside \[0, 6\)"):
        multi(dict(a=torch.zeros(1, 3, dtype=torch.long), b=torch.full((1, 3), 6)))
    with pytest.raises(ValueError, match="same shape"):
        multi(dict(a=torch.zeros(1, 3, dtype=torch.long), b=torch.zeros(1, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="non-empty dict"):
        MultiInputTransformerWrapper(num_tokens={}, max_seq_len=4, attn_layers=Encoder(dim=32, depth=1))


def test_package_exports_upstreams_attention_and_feedforward():
    import x_transformers
    import x_transformers.x_transformers as xt

    assert x_transformers.Attention is xt.Attention and x_transformers.FeedForward is xt.FeedForward


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_qk_clip_caps_each_heads_largest_logit_at_tau(kv_heads):
    from x_transformers.x_transformers import Attention

    torch.manual_seed(0)
    attn = Attention(32, dim_head=8, heads=4, causal=True, kv_heads=kv_heads).eval()
    with torch.no_grad():
        attn.to_q.weight.mul_(torch.linspace(5, 40, 4).repeat_interleave(8)[:, None])  # heads of rising logits
    x = torch.randn(2, 6, 32)
    _, inter = attn(x, return_intermediates=True)
    logits = inter.pre_softmax_attn
    q = attn.to_q(x).view(2, 6, 4, 8).transpose(1, 2)
    k = attn.to_k(x).view(2, 6, -1, 8).transpose(1, 2).repeat_interleave(4 // (kv_heads or 4), dim=1)
    manual = (q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(),
                                                               float("-inf"))
    torch.testing.assert_close(logits, manual)  # the future keys hidden, so the maxima are over visible ones
    top = logits.amax(dim=(0, 2, 3))
    tau = top.median().item()
    attn.qk_clip_(inter, tau=tau)
    _, after = attn(x, return_intermediates=True)
    torch.testing.assert_close(after.pre_softmax_attn.amax(dim=(0, 2, 3)), top.clamp(max=tau), atol=1e-4, rtol=1e-5)


def test_relative_proj_positional_bias_at_upstreams_path():
    from x_transformers.x_transformers import RelativeProjPositionalBias

    torch.manual_seed(0)
    bias = RelativeProjPositionalBias(dim=16, heads=2, num_distance_basis=3, max_dist=4)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(bias(x), bias.bias(x, torch.arange(5)[None], torch.arange(5)[None]))
    # queries the last 5 of 7 keys: query i sits at position i + 2
    torch.testing.assert_close(bias(x, seq_len_k=7), bias.bias(x, torch.arange(2, 7)[None], torch.arange(7)[None]))


def test_log_prob_of_the_key_gumbel_attention_sampled():
    from x_transformers.attend import log_prob_from_hard_attend
    from x_transformers.x_transformers import Attention

    torch.manual_seed(0)
    attn = Attention(32, dim_head=8, heads=4, causal=True, gumbel_softmax=True).train()
    x = torch.randn(2, 6, 32)
    _, inter = attn(x, return_intermediates=True)
    chosen = inter.post_softmax_attn.argmax(-1)  # (b, h, n): one-hot weights, a sampled key per query
    assert (inter.post_softmax_attn.sum(-1) - 1).abs().max() < 1e-6
    assert (chosen <= torch.arange(6)).all()  # only visible (earlier) keys are drawn
    expected = inter.pre_softmax_attn.log_softmax(-1).gather(-1, chosen[..., None])[..., 0]
    torch.testing.assert_close(log_prob_from_hard_attend(inter), expected)
    assert (log_prob_from_hard_attend(inter) <= 0).all()


def _causal_logit_maxes(attn, x):
    """Each head's largest visible logit of a plain causal self-attention block on its input x, by hand."""
    h, d = attn.heads, attn.dim_head
    q = attn.to_q(x).view(*x.shape[:2], h, d).transpose(1, 2)
    k = attn.to_k(x).view(*x.shape[:2], -1, d).transpose(1, 2).repeat_interleave(h // attn.kv_heads, dim=1)
    n = x.shape[1]
    s = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return s.amax(dim=(0, 2, 3))


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_wrapper_qk_clip_caps_every_layers_largest_logit_at_tau(kv_heads):
    """Upstream's TransformerWrapper.attn_qk_clip_(intermediates, tau): a training forward's intermediates
    hold each attention block's per-head largest logit (checked by hand on each block's input); after the
    clip every block's largest logit is at most tau, those above it exactly tau, the others untouched."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=20, max_seq_len=16, attn_layers=Decoder(
        dim=32, depth=2, heads=4, attn_dim_head=8, attn_kv_heads=kv_heads))  # training mode, as upstream's test
    attns = [b.fn for b in net.attn_layers.blocks if b.fn.__class__.__name__ == "Attention"]
    with torch.no_grad():
        for a in attns:
            a.to_q.weight.mul_(torch.linspace(2, 20, 4).repeat_interleave(8)[:, None])  # heads of rising logits
    seen = []
    hooks = [a.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for a in attns]
    x = torch.randint(0, 20, (2, 10))
    _, inter = net(x, return_intermediates=True)
    for h in hooks:
        h.remove()
    tops = inter.attn_logit_maxes
    assert len(tops) == len(attns) == 2
    for a, inp, top in zip(attns, seen, tops):
        torch.testing.assert_close(top, _causal_logit_maxes(a, inp), atol=1e-4, rtol=1e-5)
    tau = torch.cat(tops).median().item()
    assert max(t.max().item() for t in tops) > tau
    net.attn_qk_clip_(inter, tau=tau)
    # on the inputs it saw, every block's heads now peak at min(their largest logit, tau)
    for a, inp, top in zip(attns, seen, tops):
        torch.testing.assert_close(_causal_logit_maxes(a, inp), top.clamp(max=tau), atol=1e-4, rtol=1e-5)
    # the first block's input does not depend on attention: a new training forward records it within tau
    _, after = net(x, return_intermediates=True)
    assert after.attn_logit_maxes[0].max().item() <= tau * (1 + 1e-5)
    # eval / no-grad intermediates carry none (decoding keeps the fused kernels): the clip says where to get them
    net.eval()
    _, cold = net(x, return_intermediates=True)
    assert cold.attn_logit_maxes is None
    with pytest.raises(ValueError, match="training forward"):
        net.attn_qk_clip_(cold)
