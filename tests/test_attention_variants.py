"""Attention score modifications (issue 20): logit softcapping, sliding window, learned sinks, the
zero key/value. Each against a hand-written formula, on every backend that can compute it, and
accepted or refused (declared) by every model kind."""

import math

import pytest
import torch

from x_transformers import CrossAttender, Decoder, Encoder, FunnelEncoder, TransformerWrapper, XTransformer
from x_transformers.attend import AttendRequest, BackendNotSupported, attend, choose_backend, rejection_reasons
from x_transformers.cache import KVCache
from x_transformers.config import ConfigConflictError

VARIANTS = {
    "softclamp": dict(attn_softclamp_logits=True, attn_logit_softclamp_value=0.2),
    "window": dict(attn_max_attend_past=2),
    "sink": dict(attn_head_learned_sink=True),
    "zero_kv": dict(attn_add_zero_kv=True),
}


def qkv(b=2, h=4, g=4, n=8, m=8, d=16, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=gen) * scale, torch.randn(b, g, m, d, generator=gen) * scale,
            torch.randn(b, g, m, d, generator=gen))


def reference(q, k, v, *, scale, causal=False, mask=None, cap=None, past=None, sink=None, zero_kv=False):
    """softmax over the keys written out, one step at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    n, m = q.shape[-2], k.shape[-2]
    logits = (q @ k.transpose(-1, -2)) * scale  # (b, h, n, m)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    i = torch.arange(n)[:, None] + (m - n)
    j = torch.arange(m)[None, :]
    keep = torch.ones(n, m, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if past is not None:
        keep &= i - j <= past
    if mask is not None:
        keep = keep & mask
    expo = logits.exp() * keep
    denom = expo.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + sink.double().exp().view(1, -1, 1, 1)
    if zero_kv:
        denom = denom + 1.0  # exp(q . 0) = 1, times a zero value
    weights = torch.where(denom > 0, expo / denom.clamp(min=1e-300), 0.0)  # a row seeing nothing: zeros
    return weights @ v, weights


# ----------------------------------------------------------------------------------------------
# the formulas, on every backend that computes them


@pytest.mark.parametrize("backend", ["explicit", "sdpa"])
def test_sliding_window_equals_formula_and_hides_keys_further_back(backend):
    q, k, v = qkv()
    k.requires_grad_(True)
    out, _ = attend(q, k, v, causal=True, scale=0.25, max_attend_past=2, force_backend=backend)
    ref, _ = reference(q, k.detach(), v, scale=0.25, causal=True, past=2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for i in range(8):  # d out[i] / d k[j]: exactly zero for j < i - 2, non-zero inside the window
        (grad,) = torch.autograd.grad(out[:, :, i].sum(), k, retain_graph=True)
        far = grad[:, :, :max(i - 2, 0)]
        assert (far == 0).all(), f"query {i} reaches keys further back than the window"
        if i:  # (query 0 sees one key: weight 1 whatever its logit, so no gradient reaches it)
            assert grad[:, :, max(i - 2, 0):i + 1].abs().amax(dim=-1).gt(0).all()


def test_sliding_window_with_keys_from_a_cache_and_exempt_prefix():
    q, k, v = qkv(n=3, m=9)
    # first 2 keys exempt (memory / zero key-values): always visible, whatever the distance
    out, w = attend(q, k, v, causal=True, scale=0.25, max_attend_past=1, window_exempt=2, need_weights=True)
    visible = w[0, 0] > 0
    expect = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1, 1]],
                          dtype=torch.bool)
    assert torch.equal(visible, expect)
    # positions, not indices: row 1 has two padded keys (indices 5, 6) inside its sequence; the
    # window counts kept tokens back, so key 4 (position 2) is one back from query 7 (position 3)
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 2, 2, 3, 4]])
    q_pos = k_pos[:, -3:]
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 5:7] = False
    _, w2 = attend(q, k, v, mask=mask, causal=True, scale=0.25, max_attend_past=1, window_exempt=2,
                   window_positions=(q_pos, k_pos), need_weights=True)
    assert torch.equal(w2[0, 0] > 0, expect)  # unpadded: positions are the indices
    row1 = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(w2[1, 0, 1:] > 0, row1)  # (query 6 is itself padding)


@pytest.mark.parametrize("cap", [0.5, 2.0])
def test_softcap_bounds_the_logits_and_equals_gemma2_formula(cap):
    q, k, v = qkv(scale=4.0)  # raw logits far beyond the cap
    out, w = attend(q, k, v, scale=1.0, softclamp=cap, need_weights=True)
    ref, ref_w = reference(q, k, v, scale=1.0, cap=cap)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    raw = (q @ k.transpose(-1, -2)).abs().amax()
    assert raw > 10 * cap
    # log w_i - log w_j = l_i - l_j: every logit inside (-cap, cap), so no two differ by 2 * cap
    logw = w.double().log()
    spread = logw.amax(-1) - logw.amin(-1)
    assert (spread <= 2 * cap * (1 + 1e-5)).all() and spread.amax() > 1.9 * cap  # saturated, never beyond


def test_softcap_is_the_identity_far_below_the_cap():
    q, k, v = qkv(scale=0.1)
    out, _ = attend(q, k, v, scale=0.25, softclamp=1e4)
    plain, _ = attend(q, k, v, scale=0.25)
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["explicit", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_learned_sink_absorbs_mass_as_the_formula_says(backend, kv_heads):
    q, k, v = qkv(g=kv_heads)
    sink = torch.tensor([-1.0, 0.0, 1.0, 3.0], requires_grad=True)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask[1, ..., :3] = False
    out, _ = attend(q, k, v, causal=True, mask=mask, scale=0.25, sink=sink, force_backend=backend)
    r = 4 // kv_heads
    ke, ve = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    ref, ref_w = reference(q, ke, ve, scale=0.25, causal=True, mask=mask, sink=sink.detach())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # the weights over real keys sum to < 1: the rest went to the sink, more the larger its logit
    total = ref_w.sum(-1)
    alive = total > 0
    assert (total[alive] < 1).all()
    per_head = total[0, :, -1]
    assert (per_head[1:] < per_head[:-1]).all()
    if backend == "explicit":
        _, w = attend(q, k, v, causal=True, mask=mask, scale=0.25, sink=sink, need_weights=True)
        torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    out.sum().backward()
    assert sink.grad is not None and sink.grad.abs().gt(0).all()


def test_zero_kv_attends_to_nothing_as_the_formula_says():
    torch.manual_seed(0)
    model = Encoder(dim=32, depth=1, heads=4, attn_dim_head=8, attn_add_zero_kv=True)
    attn = model.layers[0][1] if hasattr(model, "layers") else None
    attn = next(m for m in model.modules() if type(m).__name__ == "Attention")
    x = torch.randn(2, 6, 32)
    got, _ = attn(x)
    q, k, v = (attn.to_q(x), attn.to_k(x), attn.to_v(x))
    q, k, v = (t.view(2, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    out, _ = reference(q, k, v, scale=8 ** -0.5, zero_kv=True)
    expect = attn.to_out(out.transpose(1, 2).reshape(2, 6, 32).float())
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# dispatch: which backend computes what, and why the others do not


def test_dispatch_reasons_name_the_variant():
    q, k, v = qkv()
    reasons = rejection_reasons(AttendRequest(q=q, k=k, v=v, softclamp=5.0))
    assert any("softcapping" in r for r in reasons["sdpa"])
    assert choose_backend(AttendRequest(q=q, k=k, v=v, softclamp=5.0)).name == "explicit"
    sink = AttendRequest(q=q, k=k, v=v, sink=torch.zeros(4))
    assert any("CUDA" in r for r in rejection_reasons(sink)["flex"])  # on CUDA flex: out * sigmoid(lse - sink)
    assert choose_backend(sink).name == "sdpa"  # a bias column
    window = AttendRequest(q=q, k=k, v=v, max_attend_past=3)
    assert choose_backend(window).name == "sdpa"  # on CPU; a bool mask
    with pytest.raises(BackendNotSupported, match="softcapping"):
        attend(q, k, v, softclamp=5.0, force_backend="sdpa")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_computes_softcap_and_window_as_the_formula(flex_on_cpu):
    q, k, v = qkv(n=24, m=24, scale=3.0)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[1, ..., :5] = False
    req = AttendRequest(q=q, k=k, v=v, causal=True, mask=mask, softclamp=2.0, max_attend_past=5)
    assert choose_backend(req).name == "flex"  # SDPA cannot softcap; flex skips the tiles outside the window
    with torch.no_grad():
        got, _ = attend(q, k, v, causal=True, mask=mask, scale=0.25, softclamp=2.0, max_attend_past=5)
    ref, _ = reference(q, k, v, scale=0.25, causal=True, mask=mask, cap=2.0, past=5)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # keys from a cache: not picked automatically (a few rows), explicit computes it
    short = AttendRequest(q=q[:, :, -1:], k=k, v=v, softclamp=2.0)
    assert choose_backend(short).name == "explicit"
    assert any("keys from a cache" in r for r in rejection_reasons(short)["flex"])


# ----------------------------------------------------------------------------------------------
# models: every kind accepts or refuses (declared), cache agreement, upstream names


def decoder(seed=0, **kw):
    torch.manual_seed(seed)
    model = TransformerWrapper(num_tokens=20, max_seq_len=32,
                               attn_layers=Decoder(dim=32, depth=2, heads=4, attn_dim_head=8, rotary_pos_emb=True, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sink"):  # away from zero, so the test sees each head's own sink
                torch.nn.init.normal_(p)
            if "to_q" in name:  # logits of order 1, not the init's 1e-3: a cap of 0.2 bends them
                p.mul_(30)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_decoding_equals_the_full_forward(variant):
    model = decoder(**VARIANTS[variant], attn_num_mem_kv=2)
    x = torch.randint(0, 20, (2, 10))
    full = model(x)
    cache = KVCache()
    steps = [model(x[:, :4], cache=cache)] + [model(x[:, t:t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_changes_the_function(variant):
    x = torch.randint(0, 20, (2, 10))
    assert not torch.allclose(decoder(**VARIANTS[variant])(x), decoder()(x), atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_model_kind_accepts_or_refuses(variant):
    kw = VARIANTS[variant]
    x = torch.randint(0, 20, (2, 6))
    Encoder(dim=32, depth=1, heads=4, **kw)(torch.randn(2, 6, 32))
    xt = XTransformer(dim=32, enc_num_tokens=20, enc_depth=1, enc_heads=4, enc_max_seq_len=16, dec_num_tokens=20,
                      dec_depth=1, dec_heads=4, dec_max_seq_len=16,
                      **{f"enc_{k}": v for k, v in kw.items()}, **{f"dec_{k}": v for k, v in kw.items()})
    assert torch.isfinite(xt(x, x)).all()
    ctx = torch.randn(2, 5, 32)
    if variant == "window":  # a cross-attention-only stack has no own keys to count back along
        with pytest.raises(ConfigConflictError, match="attn_max_attend_past"):
            CrossAttender(dim=32, depth=1, heads=4, **kw)
        with pytest.raises(ConfigConflictError, match="attn_max_attend_past"):
            FunnelEncoder(dim=32, depths=(1, 1), heads=4, **kw)
    else:
        CrossAttender(dim=32, depth=1, heads=4, **kw)(torch.randn(2, 6, 32), context=ctx)
        FunnelEncoder(dim=32, depths=(1, 1), heads=4, **kw)(torch.randn(2, 6, 32))


def test_sub_keyword_without_its_feature_is_refused():
    with pytest.raises(ValueError, match="attn_logit_softclamp_value configures attn_softclamp_logits"):
        Decoder(dim=32, depth=1, attn_logit_softclamp_value=10.0)
    with pytest.raises(ValueError, match="attn_max_attend_past"):
        Decoder(dim=32, depth=1, attn_max_attend_past=-1)
    with pytest.raises(ConfigConflictError, match="softclamp"):
        Decoder(dim=32, depth=1, attn_softclamp_logits=True, attn_backend="sdpa")


def test_sink_starts_at_zero_logit_per_head():
    model = Decoder(dim=32, depth=1, heads=4, attn_head_learned_sink=True)
    sinks = [p for n, p in model.named_parameters() if n.endswith(".sink")]
    assert len(sinks) == 1 and torch.equal(sinks[0].detach(), torch.zeros(4))
    assert math.isclose(float(sinks[0].sum()), 0.0)
