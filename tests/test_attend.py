"""attend(): backends agree, masks and causality align, dead rows are zero, dispatch explains itself."""

import pytest
import torch

from x_transformers.attend import (BACKENDS, AttendRequest, BackendNotSupported, attend, attend_backend,
                                   causal_mask, choose_backend, rejection_reasons)


def qkv(b=2, h=4, g=4, n=5, m=7, d=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return r(b, h, n, d), r(b, g, m, d), r(b, g, m, d)


def reference(q, k, v, mask=None, causal=False, bias=None, scale=None):
    """float64 softmax attention written out plainly."""
    q, k, v = q.double(), k.double(), v.double()
    h, g = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1)
    s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if bias is not None:
        s = s + bias.double()
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        keep = keep & mask
    if causal:
        keep = keep & causal_mask(s.shape[-2], s.shape[-1], s.device)
    s = s.masked_fill(~keep, float("-inf"))
    w = torch.nan_to_num(s.softmax(-1), nan=0.0)
    return w @ v


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_backends_match_reference(backend, causal, gqa, with_bias):
    q, k, v = qkv(g=2 if gqa else 4)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 5:] = False
    bias = torch.randn(1, 4, 5, 7) if with_bias else None
    try:
        out, _ = attend(q, k, v, mask=mask, causal=causal, bias=bias, force_backend=backend)
    except BackendNotSupported:
        assert rejection_reasons(AttendRequest(q=q, k=k, v=v, mask=mask, causal=causal, bias=bias))[backend]
        return
    ref = reference(q, k, v, mask, causal, bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_causal_aligns_bottom_right():
    # 2 queries over 5 keys: the queries are the last two tokens, so query 0 sees keys 0..3
    cm = causal_mask(2, 5, "cpu")
    assert cm.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    q, k, v = qkv(n=2, m=5)
    for name in BACKENDS:
        if BACKENDS[name].not_supported_reasons(AttendRequest(q=q, k=k, v=v, causal=True)):
            continue  # e.g. flex off CUDA
        out, _ = attend(q, k, v, causal=True, force_backend=name)
        torch.testing.assert_close(out.double(), reference(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def _dead_row_case():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    mask[1, :, 2] = False  # query 2 of row 1 sees nothing
    return q, k, v, mask, torch.randn(1, 4, 5, 7)


# the backends that can run this request on this machine (flex's dead rows: tests/test_flex.py)
_DEAD_ROW_BACKENDS = [name for name in sorted(BACKENDS) if not BACKENDS[name].not_supported_reasons(
    AttendRequest(q=_dead_row_case()[0], k=_dead_row_case()[1], v=_dead_row_case()[2], mask=_dead_row_case()[3],
                  bias=_dead_row_case()[4]))]


@pytest.mark.parametrize("backend", _DEAD_ROW_BACKENDS)
def test_fully_masked_rows_give_zeros_not_nan(backend):
    q, k, v, mask, bias = _dead_row_case()
    q.requires_grad_()
    out, _ = attend(q, k, v, mask=mask, bias=bias, force_backend=backend)
    assert torch.isfinite(out).all()
    assert out[1, :, 2].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_dispatch_prefers_fused_and_explains_fallback():
    q, k, v = qkv()
    assert choose_backend(AttendRequest(q=q, k=k, v=v, causal=True)).name == "sdpa"
    req = AttendRequest(q=q, k=k, v=v, pre_mix=torch.eye(4), need_weights=True)
    assert choose_backend(req).name == "explicit"
    reasons = rejection_reasons(req)["sdpa"]
    assert any("talking heads" in r for r in reasons) and any("weights" in r for r in reasons)
    with pytest.raises(BackendNotSupported, match="talking heads"):
        attend(q, k, v, pre_mix=torch.eye(4), force_backend="sdpa")


def test_force_unknown_backend_lists_valid():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="valid"):
        attend(q, k, v, force_backend="nope")
    with pytest.raises(ValueError, match="valid"):
        with attend_backend("nope"):
            pass


def test_weights_are_post_softmax_rows():
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False
    out, w = attend(q, k, v, mask=mask, need_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert (w[0, ..., 4:] == 0).all()
    torch.testing.assert_close(out, w @ v)


def test_heads_must_divide():
    q, k, v = qkv(h=4, g=3)
    with pytest.raises(ValueError, match="multiple"):
        attend(q, k, v)


class _FakeEfficientKernel(torch.autograd.Function):
    """Stands in for aten._scaled_dot_product_efficient_attention on CPU with the real kernel's
    contract: it checks the bias layout the kernel demands, computes causal attention with the
    bias, and (like the kernel, which skips the tiles above the diagonal) returns a bias gradient
    whose masked part is garbage."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        assert bias.stride(-1) == 1, "the kernel needs contiguous bias rows"
        assert bias.stride(-2) % 8 == 0 or bias.shape[-2] == 1, "the kernel reads bias rows at 16-byte alignment"
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale = scale
        return reference(q, k, v, causal=True, bias=bias, scale=scale).to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
            out = reference(*leaves[:3], causal=True, bias=leaves[3], scale=ctx.scale)
            grads = torch.autograd.grad(out, leaves, grad.double())
        gq, gk, gv, gb = (g.to(q.dtype) for g in grads)
        unwritten = ~causal_mask(bias.shape[-2], bias.shape[-1], bias.device)
        gb = gb.masked_fill(unwritten, float("nan"))  # never written by the kernel
        return gq, gk, gv, gb, None


@pytest.mark.parametrize("n", [8, 13])  # 13: the bias row is padded to a multiple of 8
@pytest.mark.parametrize("gqa", [False, True])
def test_causal_bias_kernel_path_keeps_only_the_causal_bias_gradient(monkeypatch, n, gqa):
    """The CUDA path for a bias with plain causality (attend._efficient_causal_with_bias), run on
    CPU against a stand-in kernel: same outputs and gradients as the explicit backend, the unwritten
    part of the kernel's bias gradient never reaches the bias, and T5's permuted (non-contiguous)
    bias arrives with contiguous rows."""
    import sys

    mod = sys.modules["x_transformers.attend"]
    calls = []

    def fake(q, k, v, bias, compute_lse, dropout, scale):
        assert compute_lse and dropout == 0.0
        calls.append(bias.shape)
        return _FakeEfficientKernel.apply(q, k, v, bias, scale)

    monkeypatch.setattr(mod, "_causal_bias_kernel_applies", lambda req: req.bias is not None and req.causal
                        and req.mask is None and req.q.shape[-2] == req.k.shape[-2])
    monkeypatch.setattr(mod, "_efficient_kernel", fake)
    q, k, v = qkv(h=4, g=2 if gqa else 4, n=n, m=n, seed=3)
    # (1, n, m, h) as T5 builds it, then permuted: rows not contiguous; seeded (it was drawn unseeded,
    # and one draw in a few put a float32 gradient 1.4e-6 off, past the 1e-6 tolerance)
    table = torch.randn(1, n, n, 4, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ("sdpa", "explicit"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
        bias = leaves[3].permute(0, 3, 1, 2)
        out, _ = attend(*leaves[:3], causal=True, bias=bias, force_backend=backend)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        results[backend] = (out, grads)
    assert calls and calls[0][-2:] == (n, n)
    out_s, grads_s = results["sdpa"]
    out_e, grads_e = results["explicit"]
    torch.testing.assert_close(out_s, out_e, rtol=1e-5, atol=1e-6)
    for gs, ge in zip(grads_s, grads_e):
        assert torch.isfinite(gs).all()
        torch.testing.assert_close(gs, ge, rtol=1e-5, atol=1e-6)


def test_cached_queries_on_cuda_leave_out_cudnn_attention(monkeypatch):
    """cuDNN attention plans per shape; a dynamic cache's decode steps change the key length every
    token, so queries against a longer cache take flash / memory-efficient / math (issue 22: the
    first generate() of 256 tokens took 13.9 s with cuDNN, 3.0 s without, on an H200). Training
    shapes (n == m), CPU tensors and the opt-out keep the default choice."""
    import contextlib
    from types import SimpleNamespace

    from torch.nn.attention import SDPBackend

    import importlib

    attend_mod = importlib.import_module("x_transformers.attend")

    cuda = SimpleNamespace(is_cuda=True)
    ctx = attend_mod._no_cudnn_planning(cuda, 1, 9)
    assert not isinstance(ctx, contextlib.nullcontext)
    assert SDPBackend.CUDNN_ATTENTION not in attend_mod._PLAN_FREE and SDPBackend.FLASH_ATTENTION in attend_mod._PLAN_FREE
    assert isinstance(attend_mod._no_cudnn_planning(cuda, 9, 9), contextlib.nullcontext)
    assert isinstance(attend_mod._no_cudnn_planning(torch.zeros(1), 1, 9), contextlib.nullcontext)
    with attend_mod.plan_free_attention():  # generate(): its prefill (n == m) leaves cuDNN out too
        assert not isinstance(attend_mod._no_cudnn_planning(cuda, 9, 9), contextlib.nullcontext)
    assert isinstance(attend_mod._no_cudnn_planning(cuda, 9, 9), contextlib.nullcontext)
    monkeypatch.setenv("XT_DECODE_SDPA_ALL_BACKENDS", "1")
    assert isinstance(attend_mod._no_cudnn_planning(cuda, 1, 9), contextlib.nullcontext)


def test_generate_runs_every_attention_call_outside_cudnn_planning(monkeypatch):
    """Each SDPA call of generate(), the prefill's included, runs inside plan_free_attention."""
    import importlib

    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    attend_mod = importlib.import_module("x_transformers.attend")
    scopes, original = [], attend_mod._no_cudnn_planning

    def spy(q, n, m):
        scopes.append((n, m, attend_mod._PLAN_FREE_SCOPE))
        return original(q, n, m)

    monkeypatch.setattr(attend_mod, "_no_cudnn_planning", spy)
    lm = TransformerWrapper(num_tokens=16, max_seq_len=32, attn_layers=Decoder(dim=16, depth=2, heads=2))
    AutoregressiveWrapper(lm).generate(torch.randint(0, 16, (1, 5)), 4)
    assert scopes and all(scope == 1 for _, _, scope in scopes)
    assert any(n == m for n, m, _ in scopes) and any(n != m for n, m, _ in scopes)  # the prefill and the steps
    lm(torch.randint(0, 16, (1, 5)))
    assert scopes[-1][2] == 0  # outside generate: the default choice
