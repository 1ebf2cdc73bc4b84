"""FlexAttention backend (GPU): position-bias schemes as ``score_mod``s, masks as block masks.

SDPA takes a position bias only as a dense (b|1, h, n, m) float tensor, which it must read for
every score (and, for a learned bias, write back as a gradient of the same size), and which
rules out the flash / cuDNN kernels. FlexAttention compiles the bias into the kernel instead: a
``score_mod(score, b, h, q_idx, kv_idx)`` that reads small captured tensors (ALiBi's slopes and
the positions; T5's per-offset table), with causality and key padding as a block-sparse
``BlockMask`` so fully masked tiles are skipped.

The backend is picked only when the request carries a :class:`~x_transformers.positional.ScoreMod`
(a description, not a tensor) on CUDA, with no feature that needs the score matrix, and, in
automatic dispatch, only for schemes where flex was measured faster than SDPA's float bias
(``ScoreMod.prefer_flex``); ``attend_backend("flex")`` forces it for the others.

An attention sink (a learned per-head logit s in the softmax, with a zero value) needs no extra column:
softmax over [s, scores] weights key j by softmax(scores)_j * Z / (Z + e^s), Z = e^lse, so the output is
plain attention's output times sigmoid(lse - s) (:func:`with_sink`), with flex returning lse
(differentiable) beside the output. SDPA has no differentiable logsumexp, so there the sink stays a
dense float bias column (memory-efficient kernel, no flash).

Semantics match the other backends: bottom-right causal alignment, True = keep masks, rows with
no visible key return zeros (flex gives l_i = 0 rows an output of 0 and zero gradients).

Legend: b batch, h query heads, g kv heads, n queries, m keys, d head dim.
"""

from __future__ import annotations

import torch

from .attend import AttendRequest, register_backend, score_matrix_reasons, window_mask

try:  # prototype API: absent from old torch builds
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    create_block_mask = flex_attention = None
try:  # the logsumexp request of torch >= 2.9 (what the sink reads)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - depends on the torch build
    AuxRequest = None

_compiled_flex = None
_MASKLESS: dict = {}  # (causal, n, m, device) -> BlockMask: without a mask tensor it is reusable across forwards


def compiled_flex_attention():
    """flex_attention compiled once, lazily (uncompiled it materialises the scores: no gain).

    Each scheme / mask layout / dtype is a separate graph; raise torch._dynamo.config
    ``cache_size_limit`` (default 8) when one process runs many of them (the benchmarks do)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _as_4d(mask):
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def flex_mask_mod(mask, causal: bool, n: int, m: int):
    """mask_mod(b, h, q_idx, kv_idx) for a bool mask broadcastable to (b, h, n, m) and bottom-right
    causality (query i sees keys j <= i + m - n); None when every score is visible."""
    if mask is None and not causal:
        return None
    offset = m - n
    pick = None  # bound on every path: dynamo reads a closure's cells when it traces the call (an unbound
    # one was a graph break in every layer of a compiled causal model on flex without a mask, issue 20)
    if mask is not None:
        mask = _as_4d(mask)
        # a broadcast dimension is read at index 0; decided here, at trace time
        pick = [(lambda i: i) if size > 1 else (lambda i: 0) for size in mask.shape]

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx + offset if causal else None
        if mask is not None:
            visible = mask[pick[0](b), pick[1](h), pick[2](q_idx), pick[3](kv_idx)]
            keep = visible if keep is None else keep & visible
        return keep
    return mask_mod


def _create_block_mask(mask, causal: bool, b: int, h: int, n: int, m: int, device):
    mask_mod = flex_mask_mod(mask, causal, n, m)
    if mask_mod is None:
        return None
    mb, mh = _as_4d(mask).shape[:2] if mask is not None else (1, 1)
    return create_block_mask(mask_mod, b if mb > 1 else None, h if mh > 1 else None, n, m, device=device)


def block_mask_for(req: AttendRequest):
    """The BlockMask of req's mask and causality, built once per forward and memoised on the
    ScoreMod every layer shares. The mask tensor is recognised by identity (``is``: an ``id()``
    does not trace under torch.compile, and the compiled decode step comes here). Memory
    key/values pad the mask per layer, so there it is built per layer. Without a mask tensor,
    eager forwards share one BlockMask per (causal, n, m, device) across forwards (not under
    compile: a compiled graph builds its own instead of reading or writing a module global)."""
    b, h, n, _ = req.q.shape
    m = req.k.shape[-2]
    causal = req.causal and n > 1  # one query at the bottom row sees every key
    mask = req.mask
    if req.max_attend_past is not None:
        # the sliding window (over positions, which padding does not move) joins the mask: the
        # block mask then skips every tile outside it. Built per layer (the positions differ in
        # the memory / zero key-value prefix a layer adds).
        window = window_mask(req)
        return _create_block_mask(window if mask is None else mask & window, causal, b, h, n, m, req.q.device)
    if mask is None and not torch.compiler.is_compiling():
        key = (causal, n, m, str(req.q.device))
        if key not in _MASKLESS:
            if len(_MASKLESS) > 64:
                _MASKLESS.clear()
            _MASKLESS[key] = _create_block_mask(None, causal, b, h, n, m, req.q.device)
        return _MASKLESS[key]
    if req.score_mod is None:  # softcapping without a position bias: no per-forward memo to hold it
        return _create_block_mask(mask, causal, b, h, n, m, req.q.device)
    built = req.score_mod.memo.setdefault(("block_masks", causal, b, h, n, m), [])  # [(mask, BlockMask)]
    for seen, block_mask in built:
        if seen is mask:
            return block_mask
    block_mask = _create_block_mask(mask, causal, b, h, n, m, req.q.device)
    built.append((mask, block_mask))  # the mask is held, so `is` never meets a recycled tensor
    return block_mask


def _score_mod(req: AttendRequest):
    """The request's position bias then its softcapping, as one flex score_mod (None: neither)."""
    bias = req.score_mod.flex_score_mod(req.q.shape[0]) if req.score_mod is not None else None
    cap = req.softclamp
    if cap is None:
        return bias

    def score_mod(score, b, h, q_idx, kv_idx):
        if bias is not None:
            score = bias(score, b, h, q_idx, kv_idx)
        # cap tanh(s / cap) written as cap (2 sigmoid(2 s / cap) - 1): the same function, but Triton lowers
        # sigmoid to one fast exp where tanh is libdevice's polynomial (4x the flex forward kernel's time on
        # an H200, benchmarks/results/attn_variants_h200.json)
        return (torch.sigmoid(score * (2.0 / cap)) * 2.0 - 1.0) * cap
    return score_mod


class FlexBackend:
    name = "flex"
    reads_score_mod = True  # attend() hands it the ScoreMod, not a materialised bias

    def not_supported_reasons(self, req: AttendRequest) -> list[str]:
        reasons = []
        if flex_attention is None:
            reasons.append("torch.nn.attention.flex_attention is not available in this torch build")
        if req.q.device.type != "cuda":
            reasons.append(f"FlexAttention is used on CUDA only; inputs are on {req.q.device.type} "
                           f"(on CPU it has no backward and its fused kernel is inference-only)")
        if req.score_mod is None and req.softclamp is None and req.max_attend_past is None and req.sink is None:
            reasons.append("no score modification in the request (a position bias, softcapping, a sliding "
                           "window or a sink; without one SDPA's flash kernel is faster)")
        if req.sink is not None and AuxRequest is None:
            reasons.append("an attention sink needs flex's logsumexp (AuxRequest, torch >= 2.9), which this "
                           "torch build lacks (SDPA takes the sink as a bias column)")
        if req.bias is not None:
            reasons.append("a dense bias tensor is added (e.g. shared-QK's self penalty); flex reads only score_mods")
        reasons += score_matrix_reasons(req)
        if req.dropout > 0:
            reasons.append("FlexAttention has no attention dropout")
        if not (req.q.dtype == req.k.dtype == req.v.dtype):
            reasons.append(f"q, k, v dtypes differ ({req.q.dtype}, {req.k.dtype}, {req.v.dtype})")
        if req.q.shape[-1] < 16 or req.v.shape[-1] < 16:
            reasons.append("head dims below 16 are too small for flex's Triton tiles")
        return reasons

    def slower_reasons(self, req: AttendRequest) -> list[str]:
        sm = req.score_mod
        if req.q.shape[-2] != req.k.shape[-2] and sm is None:
            return [f"keys from a cache ({req.q.shape[-2]} queries, {req.k.shape[-2]} keys): a few rows of "
                    f"scores, computed without compiling a kernel; force with attend_backend('flex')"]
        if req.softclamp is not None or req.max_attend_past is not None or req.sink is not None:
            # SDPA cannot softcap, and takes a window or a sink only as a dense mask / bias without flash
            return []
        if sm is not None and not sm.prefer_flex:
            return [f"{sm.name} bias: flex not measured faster than SDPA's float bias "
                    f"(benchmarks/results/attention_bias_gpu.json); force with attend_backend('flex')"]
        if sm is not None and sm.prefer_flex == "compiled" and not torch.compiler.is_compiling():
            return [f"{sm.name} bias outside torch.compile: flex measured faster only in the compiled step "
                    f"(eager: equal, and each new shape would build a flex kernel); force with attend_backend('flex')"]
        if sm is not None and req.q.shape[-2] != req.k.shape[-2]:
            # Measured faster for training (n == m). With keys from a cache the dense bias is a few
            # rows (b, h, n, m); and inside a compiled decode step, a score_mod reading the cache's
            # positions fails inductor's lowering (torch 2.11, H200: "convert FlexibleLayout to
            # FixedLayout first"), so compiled decoding with ALiBi would fall back to uncompiled.
            return [f"{sm.name} bias with keys from a cache ({req.q.shape[-2]} queries, {req.k.shape[-2]} keys): "
                    f"the dense bias is small, and flex's score_mod does not compile in a decode step; "
                    f"force with attend_backend('flex')"]
        return []

    def __call__(self, req: AttendRequest):
        q, k, v, sm = req.q, req.k, req.v, req.score_mod
        score_mod, block_mask = _score_mod(req), block_mask_for(req)
        # inside a compiled region (the compiled decode step) the enclosing compile compiles flex too
        kernel = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
        # q, k, v already carry the compute dtype; autocast around the higher-order op adds nothing
        aux = {} if req.sink is None else dict(return_aux=AuxRequest(lse=True))
        with torch.autocast(q.device.type, enabled=False):
            out = kernel(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=req.scale,
                         enable_gqa=req.heads_per_kv > 1, kernel_options=sm.kernel_options if sm else None, **aux)
        if req.sink is None:
            return out, None
        out, aux = out
        lse = aux.lse
        if (not torch.compiler.is_compiling() and torch.is_grad_enabled() and not lse.requires_grad
                and any(t.requires_grad for t in (q, k, v, req.sink))):
            raise RuntimeError("flex_attention returned a logsumexp without a gradient in this torch build; the "
                               "sink's output would miss its gradient terms (use attend_backend('sdpa'))")
        return with_sink(out, lse, req.sink), None


def with_sink(out, lse, sink):
    """Attention with a per-head sink logit ``sink`` (h,) from plain attention's output out (b, h, n, e)
    and its logsumexp lse (b, h, n): out * sigmoid(lse - sink) (the sink's share of the normaliser
    removed). A row with no visible key (lse = -inf) stays zero."""
    dtype = torch.promote_types(lse.dtype, torch.float32)  # flex's lse is float32 whatever the inputs
    gate = torch.sigmoid(lse.to(dtype) - sink.to(dtype).view(1, -1, 1))
    return out * gate.unsqueeze(-1).to(out.dtype)


register_backend(FlexBackend(), before="sdpa")

__all__ = ["FlexBackend", "block_mask_for", "compiled_flex_attention", "flex_mask_mod", "with_sink"]
