"""Issue 20 on the flex path: an attention sink as out * sigmoid(lse - s) (no extra softmax column, no
dense bias), softcapping and the sliding window dispatched to FlexAttention with the window as block
sparsity, and the dispatcher's reasons where a variant falls back.

On CPU flex has no backward, so the sink's gradients are checked on the formula itself, fed by a
differentiable plain attention's output and logsumexp (what flex returns on CUDA); flex's own forward
(eager, CUDA check lifted) is checked against the explicit softmax with the sink column.
GPU agreement, gradients included: benchmarks/gpu_check_sinks.py."""

import pytest
import torch

from x_transformers import Decoder, flex
from x_transformers.attend import AttendRequest, attend, attend_backend, choose_backend, combined_mask, rejection_reasons


def qkv(b=2, h=4, g=4, n=24, m=24, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, x, s, d, generator=gen, dtype=torch.float64) for x, s in ((h, n), (g, m), (g, m))]


def padding(b=2, m=24, dead_row=False):
    mask = torch.ones(b, m, dtype=torch.bool)
    mask[1, :5] = False  # row 1 left-padded
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return mask, positions


CASES = {
    "causal": dict(causal=True),
    "causal_padded": dict(causal=True, padded=True),
    "causal_window": dict(causal=True, max_attend_past=5),
    "window_padded_positions": dict(causal=True, padded=True, max_attend_past=4, positions=True),
    "bidirectional_gqa": dict(causal=False, g=2),
    "dead_rows": dict(causal=False, padded=True, dead=True),
}


def options(case):
    c = CASES[case]
    opts = dict(causal=c["causal"], scale=0.3)
    if c.get("padded"):
        mask, pos = padding()
        key_mask = mask[:, None, None].clone()
        if c.get("dead"):
            key_mask[1] = False  # every key of batch row 1 masked: its outputs are zero
        opts["mask"] = key_mask
        if c.get("positions"):
            opts["window_positions"] = (pos, pos)
    if c.get("max_attend_past") is not None:
        opts["max_attend_past"] = c["max_attend_past"]
    return opts


def scores_and_mask(q, k, v, opts):
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ k.transpose(-1, -2) * opts["scale"], combined_mask(AttendRequest(q=q, k=k, v=v, **opts))


def sink_column_softmax(q, k, v, sink, opts):
    """The definition, in float64: softmax over [sink logit, visible scores], the sink's value zero."""
    scores, mask = scores_and_mask(q, k, v, opts)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    column = sink.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    weights = torch.cat((column, scores), dim=-1).softmax(dim=-1)[..., 1:]
    return weights @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def plain_out_and_lse(q, k, v, opts):
    """Plain attention's output and its scores' logsumexp (b, h, n), both differentiable, -inf on a row
    with no visible key: what flex returns on CUDA."""
    scores, mask = scores_and_mask(q, k, v, opts)
    if mask is not None:
        keep = mask.any(-1, keepdim=True)
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~keep, 0.0)  # finite on dead rows
    out = scores.softmax(dim=-1) @ v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    lse = scores.logsumexp(-1)
    if mask is None:
        return out, lse
    return out * keep, lse.masked_fill(~keep[..., 0], float("-inf"))


@pytest.mark.parametrize("case", list(CASES))
def test_sink_from_out_and_lse_equals_the_sink_column_in_values_and_gradients(case):
    q, k, v = (t.requires_grad_() for t in qkv(g=CASES[case].get("g", 4)))
    sink = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    opts = options(case)
    ref = sink_column_softmax(q, k, v, sink, opts)
    torch.testing.assert_close(attend(q, k, v, sink=sink, force_backend="explicit", **opts)[0], ref,
                               rtol=1e-5, atol=1e-6)  # (its softmax in float32)
    w = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v, sink))
    out, lse = plain_out_and_lse(q, k, v, opts)
    got = flex.with_sink(out, lse, sink)
    got_grads = torch.autograd.grad((got * w).sum(), (q, k, v, sink))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip("q k v sink".split(), got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    assert ref_grads[3].abs().min() > 0  # the sink logit is learned: every head's gets a gradient
    if CASES[case].get("dead"):
        assert (got[1] == 0).all()


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("softclamp", [None, 2.0])
def test_flex_forward_with_a_sink_equals_explicit(case, softclamp, flex_on_cpu):
    q, k, v = (t.float() for t in qkv(g=CASES[case].get("g", 4)))
    sink = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    opts = dict(options(case), sink=sink, softclamp=softclamp)
    req = AttendRequest(q=q, k=k, v=v, **opts)
    assert choose_backend(req).name == "flex"  # (CUDA check lifted) automatic dispatch takes flex
    with torch.no_grad():
        got, _ = attend(q, k, v, **opts)
        ref, _ = attend(q, k, v, force_backend="explicit", **opts)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if CASES[case].get("dead"):
        assert (got[1] == 0).all()


def test_dispatch_reasons_name_why_each_variant_falls_back(flex_on_cpu):
    q, k, v = (t.float() for t in qkv())
    sink = torch.zeros(4)
    for variant in (dict(sink=sink), dict(softclamp=30.0), dict(max_attend_past=8)):
        req = AttendRequest(q=q, k=k, v=v, causal=True, **variant)
        assert choose_backend(req).name == "flex", variant  # the fused kernel, no dense mask
        dropped = AttendRequest(q=q, k=k, v=v, causal=True, dropout=0.1, **variant)
        assert any("dropout" in r for r in rejection_reasons(dropped)["flex"]), variant
        assert choose_backend(dropped).name == ("explicit" if "softclamp" in variant else "sdpa")
    # one query against cached keys: SDPA's dense sink column is a few rows, flex would compile a kernel
    cached = AttendRequest(q=q[:, :, -1:], k=k, v=v, causal=True, sink=sink)
    assert choose_backend(cached).name == "sdpa"
    assert any("keys from a cache" in r for r in rejection_reasons(cached)["flex"])
    # a torch without flex's logsumexp request: the sink falls back to SDPA, saying so
    flex_aux = flex.AuxRequest
    try:
        flex.AuxRequest = None
        req = AttendRequest(q=q, k=k, v=v, causal=True, sink=sink)
        assert choose_backend(req).name == "sdpa"
        assert any("logsumexp" in r for r in rejection_reasons(req)["flex"])
    finally:
        flex.AuxRequest = flex_aux


def test_dispatch_on_cpu_says_cuda_for_every_variant():
    q, k, v = (t.float() for t in qkv())
    for variant in (dict(sink=torch.zeros(4)), dict(softclamp=30.0), dict(max_attend_past=8)):
        reasons = rejection_reasons(AttendRequest(q=q, k=k, v=v, causal=True, **variant))["flex"]
        assert reasons and all("CUDA" in r for r in reasons), variant


def test_sliding_window_block_mask_skips_the_tiles_outside_the_window():
    n, window = 1024, 256
    q = torch.zeros(1, 1, n, 16)
    req = AttendRequest(q=q, k=q, v=q, causal=True, max_attend_past=window)
    block_mask = flex.block_mask_for(req)
    dense = torch.ones(n, n, dtype=torch.bool).tril() & (torch.arange(n)[:, None] - torch.arange(n) <= window)
    tiles = dense.view(n // 128, 128, n // 128, 128).any(dim=(1, 3))  # the 128 x 128 tiles holding a visible score
    counted = block_mask.kv_num_blocks.sum() + (block_mask.full_kv_num_blocks.sum()
                                                 if block_mask.full_kv_num_blocks is not None else 0)
    assert counted == tiles.sum() == 21  # of the causal mask's 36 (and 64 in all)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), tiles)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("variant", ["attn_softclamp_logits", "attn_max_attend_past", "attn_head_learned_sink"])
def test_compiled_model_keeps_flex_in_one_graph(variant, flex_on_cpu, monkeypatch):
    """Inside torch.compile the layer calls flex_attention itself (no nested compiled call): the graph
    holds the flex higher-order op, which inductor lowers to its fused kernel, with no graph break."""
    from torch.nn.attention import flex_attention as flex_api

    monkeypatch.setattr(flex, "create_block_mask", flex_api.create_block_mask)  # not the fixture's counter
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    kw = {variant: 6 if variant == "attn_max_attend_past" else True}
    if variant == "attn_softclamp_logits":
        kw["attn_logit_softclamp_value"] = 2.0  # small enough to change the output
    model = Decoder(dim=64, depth=1, heads=4, causal=True, **kw).eval()
    if variant == "attn_head_learned_sink":
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1 and p.shape == (4,) and p.abs().sum() == 0:
                    p.normal_()
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        with attend_backend("explicit"):
            ref = model(x)
        got = torch.compile(model, backend=recording_backend, fullgraph=True)(x)
    assert len(graphs) == 1
    hops = [node for node in graphs[0].graph.nodes if node.target is torch.ops.higher_order.flex_attention]
    assert len(hops) == 1  # the attention on flex
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
