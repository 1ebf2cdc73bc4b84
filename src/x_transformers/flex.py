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

Semantics match the other backends: bottom-right causal alignment, True = keep masks, rows with
no visible key return zeros (flex gives l_i = 0 rows an output of 0 and zero gradients).

Legend: b batch, h query heads, g kv heads, n queries, m keys, d head dim.
"""

from __future__ import annotations

import torch

from .attend import AttendRequest, register_backend, score_matrix_reasons

try:  # prototype API: absent from old torch builds
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    create_block_mask = flex_attention = None

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


def block_mask_for(req: AttendRequest):
    """The BlockMask of req's mask and causality. Without a mask tensor: cached across forwards.
    With one: built once per forward, memoised on the ScoreMod every layer shares, keyed by the
    mask tensor's identity (held, so ids stay unique). Memory key/values pad the mask per layer,
    so there it is built per layer."""
    b, h, n, _ = req.q.shape
    m = req.k.shape[-2]
    causal = req.causal and n > 1  # one query at the bottom row sees every key
    mask = req.mask
    if mask is None:
        key = (causal, n, m, str(req.q.device))
        if key not in _MASKLESS:
            if len(_MASKLESS) > 64:
                _MASKLESS.clear()
            mask_mod = flex_mask_mod(None, causal, n, m)
            _MASKLESS[key] = None if mask_mod is None else create_block_mask(mask_mod, None, None, n, m, device=req.q.device)
        return _MASKLESS[key]
    key = ("block_mask", id(mask), mask._version if mask is not None else None, causal, b, h, n, m)
    memo = req.score_mod.memo
    if key not in memo:
        mb, mh = _as_4d(mask).shape[:2]
        memo[key] = (mask, create_block_mask(flex_mask_mod(mask, causal, n, m), b if mb > 1 else None,
                                             h if mh > 1 else None, n, m, device=req.q.device))
    return memo[key][1]


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
        if req.score_mod is None:
            reasons.append("no position-bias score_mod in the request (without one SDPA's flash kernel is faster)")
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
        if sm is not None and not sm.prefer_flex:
            return [f"{sm.name} bias: flex not measured faster than SDPA's float bias "
                    f"(benchmarks/results/attention_bias_gpu.json); force with attend_backend('flex')"]
        return []

    def __call__(self, req: AttendRequest):
        q, k, v, sm = req.q, req.k, req.v, req.score_mod
        score_mod, block_mask = sm.flex_score_mod(q.shape[0]), block_mask_for(req)
        # q, k, v already carry the compute dtype; autocast around the higher-order op adds nothing
        with torch.autocast(q.device.type, enabled=False):
            out = compiled_flex_attention()(
                q, k, v, score_mod=score_mod, block_mask=block_mask, scale=req.scale,
                enable_gqa=q.shape[1] != k.shape[1], kernel_options=sm.kernel_options,
            )
        return out, None


register_backend(FlexBackend(), before="sdpa")

__all__ = ["FlexBackend", "block_mask_for", "compiled_flex_attention", "flex_mask_mod"]
