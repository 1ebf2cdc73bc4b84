"""One ``attend()`` for every attention computation in the library.

Backends declare what they support (``not_supported_reasons``); the dispatcher takes the first
one, in priority order, that computes the requested function, and can say why it rejected the
others. Backends:

- ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (flash / cuDNN / memory-efficient on
  GPU, a fused C++ kernel on CPU). Handles masks, causality, an additive float bias, GQA, dropout.
- ``explicit``: materialises the scores. Needed by features that change the normalisation or
  read the weights: talking heads, entmax, top-k sparsity, returning attention maps.
- further backends (FlexAttention on GPU, ``flex.py``) register themselves with :func:`register_backend`.

A position bias may arrive as a description (``score_mod``, a :class:`~x_transformers.positional.ScoreMod`)
instead of a tensor: a backend that reads it (``reads_score_mod = True``) computes the bias in its
kernel; for any other backend ``attend()`` materialises it (``score_mod.dense()``) first.

Conventions: masks are boolean, True = keep. Causal masking aligns bottom-right: with n queries
and m >= n keys (a cache, persistent memory), query i sees keys j <= i + m - n. A query row whose
keys are all masked returns zeros on every backend, never NaN.

Legend: b batch, h query heads, g kv heads, n queries, m keys, d head dim, e value dim.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import score_variants


@dataclass
class AttendRequest:
    q: Tensor  # (b, h, n, d)
    k: Tensor  # (b, g, m, d)
    v: Tensor  # (b, g, m, e)
    mask: Tensor | None = None  # bool, broadcastable to (b, h, n, m)
    causal: bool = False
    bias: Tensor | None = None  # float, broadcastable to (b, h, n, m), added to scaled scores
    score_mod: object | None = None  # a positional ScoreMod: added to the scores like bias (both may be set)
    scale: float | Tensor | None = None  # a tensor (1, h, 1, 1) only where the explicit backend computes
    dropout: float = 0.0
    normalizer: str = "softmax"  # "softmax", "entmax15", "entmax_bisect", "sigmoid" (unnormalised, 2409.04431)
    entmax_alpha: Tensor | float | None = None  # for entmax_bisect; tensor broadcastable to (1, h, 1, 1)
    sparse_topk: int | None = None
    pre_mix: Tensor | None = None  # (h, h) head mixing of the logits (talking heads)
    post_mix: Tensor | None = None  # (h, h) head mixing of the weights
    need_weights: bool = False
    # g as the configuration says it (a Python int), None: read from k. Under torch.compile k's
    # sizes may be symbolic, and a decision on them a SymBool that a kernel's bool argument refuses.
    kv_heads: int | None = None
    # the pre-softmax scores' logsumexp per query (b, h, n) goes to the active record_logsumexp
    # sink (the attention z-loss, 2202.08906): the scores must exist, so the explicit path computes it
    need_lse: bool = False
    # score modifications (``attention_variants.py`` documents each):
    softclamp: float | None = None  # logits -> c * tanh(logits / c) after any bias (Gemma 2 softcapping)
    # sliding window: a query sees keys at most this many positions back (upstream's max_attend_past),
    # positions given as (q_pos (b|1, n), k_pos (b|1, m - window_exempt)) longs (None: indices, the
    # queries the last n keys); the first ``window_exempt`` keys (memory / zero key-values) always visible
    max_attend_past: int | None = None
    window_positions: tuple[Tensor, Tensor] | None = None
    window_exempt: int = 0
    # attention sink (gpt-oss): a learned per-head logit (h,) in the softmax with a zero value
    sink: Tensor | None = None
    # scores as the negative squared distance -|q - k|^2 * scale (2102.06813's L2 attention)
    l2_distance: bool = False
    # signed weights (cog attention, 2411.07176): normalise |logits|, then give each weight its logit's sign
    signed: bool = False
    # residual attention (RealFormer, 2012.11747): the previous layer's pre-softmax scores (b, h, n, m)
    # added to the scaled scores; ``scores_out``, a list this call appends its own pre-softmax scores
    # (before masking) to, for the next layer
    prev_scores: Tensor | None = None
    scores_out: list | None = None
    # score_variants.py: normalizer "hard" / "gumbel" (gumbel_temp, gumbel_hard; sample: add the noise,
    # training), top-k with softmax's gradient, selective attention, inverted (softmax over the
    # queries, query_mask (b, n) the kept ones), and a head mix of the logits scaling the weights
    gumbel_temp: float = 1.0
    gumbel_hard: bool = True
    sample: bool = False
    topk_straight_through: bool = False
    selective: bool = False
    inverted: bool = False
    query_mask: Tensor | None = None
    scale_mix: Tensor | None = None  # (h, h)
    # contextual positions (CoPE, data_positions.py): a callable (q, scores, mask) -> a score term
    # (b, h, n, m) from the scaled, biased scores and the visible keys, added after masking
    cope: object | None = None
    custom_fn: object | None = None  # normalizer "custom": a user's scores (masked) -> weights

    @property
    def heads_per_kv(self) -> int:
        """Query heads per key/value head (1 unless grouped-query / multi-query attention)."""
        g = self.kv_heads if self.kv_heads is not None else self.k.shape[1]
        return self.q.shape[1] // g


class BackendNotSupported(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# shared helpers


def causal_mask(n: int, m: int, device) -> Tensor:
    """(n, m) bool, bottom-right aligned: query i sees keys j <= i + m - n."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + (m - n)


def window_mask(req: AttendRequest) -> Tensor:
    """(b|1, 1, n, m) bool, the sliding window: query i sees key j when pos(i) - pos(j) <=
    max_attend_past (keys ahead stay visible: only the past is limited), and always the first
    ``window_exempt`` keys. Positions count kept tokens, so padding moves no window."""
    n, m, e, device = req.q.shape[-2], req.k.shape[-2], req.window_exempt, req.q.device
    if req.window_positions is None:
        q_pos, k_pos = torch.arange(m - n, m, device=device)[None], torch.arange(e, m, device=device)[None]
    else:
        q_pos, k_pos = req.window_positions
    keep = q_pos[:, None, :, None] - k_pos[:, None, None, :] <= req.max_attend_past  # (b|1, 1, n, m - e)
    return F.pad(keep, (e, 0), value=True)


def combined_mask(req: AttendRequest) -> Tensor | None:
    """The key-padding / explicit mask, the causal mask and the sliding window as one bool tensor, or None."""
    n, m = req.q.shape[-2], req.k.shape[-2]
    mask = req.mask
    if req.causal and n > 1:  # one query at the bottom row sees every key
        cm = causal_mask(n, m, req.q.device)
        mask = cm if mask is None else mask & cm
    if req.max_attend_past is not None:
        wm = window_mask(req)
        mask = wm if mask is None else mask & wm
    return mask


def softclamp(scores: Tensor, value: float) -> Tensor:
    """Gemma 2's logit softcapping (2408.00118): value * tanh(scores / value), inside (-value, value)."""
    return torch.tanh(scores / value) * value


def _expand_kv(req: AttendRequest):
    r = req.heads_per_kv
    if r == 1:
        return req.k, req.v
    return req.k.repeat_interleave(r, dim=1), req.v.repeat_interleave(r, dim=1)


# --------------------------------------------------------------------------------------------
# backends


def score_matrix_reasons(req: AttendRequest) -> list[str]:
    """Why a fused softmax-attention kernel cannot compute ``req``: the features that need scores.

    The one statement of that rule at dispatch (SDPA and flex both ask it); ``AttentionConfig.
    needs_scores`` states it over keywords, and test_attention checks the two agree."""
    reasons = []
    if req.normalizer != "softmax":
        reasons.append(f"normalizer {req.normalizer!r} is not softmax")
    if req.sparse_topk is not None:
        reasons.append("top-k sparsity needs the score matrix")
    if req.pre_mix is not None or req.post_mix is not None:
        reasons.append("talking heads mix the score matrix across heads")
    if req.need_weights:
        reasons.append("attention weights were requested")
    if req.need_lse:
        reasons.append("the scores' logsumexp or maxima were requested (attention z-loss, QK-clip)")
    if req.l2_distance:
        reasons.append("L2-distance scores are not dot products")
    if req.signed:
        reasons.append("signed weights normalise |scores| and need their signs")
    if req.prev_scores is not None or req.scores_out is not None:
        reasons.append("residual attention adds the previous layer's scores and passes its own on")
    if req.selective:
        reasons.append("selective attention subtracts earlier queries' scores")
    if req.inverted:
        reasons.append("inverted attention normalises over the queries")
    if req.scale_mix is not None:
        reasons.append("pre-scale-post talking heads multiply the weights by mixed scores")
    if req.cope is not None:
        reasons.append("CoPE's positions are sums of gates over the scores")
    return reasons


def _causal_bias_kernel_applies(req: AttendRequest) -> bool:
    """A float bias with plain causality (no mask, n == m) on CUDA: F.scaled_dot_product_attention
    refuses attn_mask together with is_causal, so the causal mask would be folded into the bias
    and the kernel would compute every tile; its memory-efficient kernel takes both directly."""
    q, k = req.q, req.k
    return (req.bias is not None and req.causal and req.mask is None and q.is_cuda
            and req.max_attend_past is None and req.sink is None
            and q.shape[-2] == k.shape[-2] and q.shape[-2] > 1
            and q.shape[-1] % 8 == 0 and req.v.shape[-1] % 8 == 0 and q.dtype in _EFFICIENT_DTYPES)


_EFFICIENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _efficient_causal_with_bias(req: AttendRequest) -> Tensor:
    """softmax(q k^T * scale + bias, causal) v through ATen's memory-efficient attention with its
    causal flag (tiles above the diagonal skipped) and the bias as a differentiable input."""
    q = req.q
    k, v = _expand_kv(req)  # the kernel has no grouped key/value heads
    b, h, n, m = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    bias = req.bias.to(q.dtype)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    if bias.requires_grad:
        # The kernel writes the bias gradient only in the tiles it computes: the skipped tiles
        # above the diagonal hold whatever the buffer held. Keep only the causal part of it.
        bias = torch.where(causal_mask(n, m, q.device), bias, bias.detach())
    # rows contiguous (T5's table arrives permuted from (b, n, m, h)), at 16-byte alignment
    bias = bias.contiguous()
    if m % 8:
        bias = F.pad(bias, (0, 8 - m % 8))[..., :m]
    bias = bias.expand(b, h, n, m)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    return _efficient_kernel(q, k, v, bias, grad, req.dropout, req.scale)  # (b, h, n, e)


def _efficient_kernel(q, k, v, bias, compute_lse: bool, dropout: float, scale):
    """ATen's memory-efficient attention, causal flag on (the tests put a CPU stand-in here)."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, compute_lse, dropout, True, scale=scale)[0]


# cuDNN attention builds an execution plan for every new shape (tens of milliseconds each). A decode
# step with the dynamic cache has a new key length every token, so the first generate() of a process
# would plan 256 times for 256 tokens (16 s at the GPT-2-small shape, issue 22). Queries against a
# longer cache (n != m) therefore take flash / memory-efficient / math, which need no plan.
# XT_DECODE_SDPA_ALL_BACKENDS=1 keeps cuDNN there (the benchmark's comparison).
_PLAN_FREE = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# generate() leaves cuDNN out of its prefill too: the prefill has the prompt's length, a new shape for
# most calls, and planning it took 50 ms a layer (0.6 s of a first generate's 3.2 s on an H200,
# benchmarks/results/first_generate_profile_h200.txt).
_PLAN_FREE_SCOPE = 0


@contextlib.contextmanager
def plan_free_attention():
    """Inside, SDPA on CUDA never takes cuDNN attention, whatever the shapes (generate() enters it)."""
    global _PLAN_FREE_SCOPE
    _PLAN_FREE_SCOPE += 1
    try:
        yield
    finally:
        _PLAN_FREE_SCOPE -= 1


def _no_cudnn_planning(q: Tensor, n: int, m: int):
    if not q.is_cuda or torch.compiler.is_compiling() or os.environ.get("XT_DECODE_SDPA_ALL_BACKENDS") == "1":
        return contextlib.nullcontext()
    if n == m and not _PLAN_FREE_SCOPE:
        return contextlib.nullcontext()
    return sdpa_kernel(_PLAN_FREE)


class SDPABackend:
    name = "sdpa"

    def not_supported_reasons(self, req: AttendRequest) -> list[str]:
        reasons = score_matrix_reasons(req)
        if req.softclamp is not None:
            reasons.append("logit softcapping (tanh of the scores) is not an additive bias SDPA can take")
        return reasons

    def __call__(self, req: AttendRequest):
        q, k, v = req.q, req.k, req.v
        n, m = q.shape[-2], k.shape[-2]
        if _causal_bias_kernel_applies(req):
            return _efficient_causal_with_bias(req), None
        mask = req.mask
        is_causal = False
        if req.causal and mask is None and req.bias is None and n == m and req.max_attend_past is None \
                and req.sink is None:
            is_causal = True  # the flash / cuDNN fast path
        else:
            mask = combined_mask(req)  # the sliding window is a bool mask here
        keep_rows = None
        if mask is not None:
            keep_rows = mask.any(dim=-1, keepdim=True)  # rows with no visible key
            mask = mask | ~keep_rows  # unmask them to avoid NaN; zeroed below
        attn_mask = mask
        if req.bias is not None:
            bias = req.bias.to(q.dtype)
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        if req.sink is not None:
            # the sink as one more key: a zero key and value whose logit is the bias column sink[h]
            k, v = F.pad(k, (0, 0, 1, 0)), F.pad(v, (0, 0, 1, 0))
            if attn_mask is None:
                attn_mask = torch.zeros(1, 1, 1, m, dtype=q.dtype, device=q.device)
            elif attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
            attn_mask = _with_sink_column(attn_mask, req.sink.to(q.dtype), q.shape[0], q.shape[1], n)
        with _no_cudnn_planning(q, n, m):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=req.dropout, is_causal=is_causal, scale=req.scale,
                enable_gqa=req.heads_per_kv > 1,
            )
        if keep_rows is not None:
            out = out * keep_rows.to(out.dtype)
        return out, None


def _with_sink_column(bias: Tensor, sink: Tensor, b: int, h: int, n: int) -> Tensor:
    """A float bias (..., n|1, m) with the per-head sink logits (h,) prepended as column 0."""
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    bias = bias.expand(bias.shape[0], h, bias.shape[2], bias.shape[3])
    column = sink.view(1, h, 1, 1).expand(bias.shape[0], h, bias.shape[2], 1)
    return torch.cat((column, bias), dim=-1)


def _normalize(scores: Tensor, req: AttendRequest) -> Tensor:
    if req.normalizer == "softmax":
        return scores.softmax(dim=-1, dtype=torch.float32).to(scores.dtype)
    if req.normalizer == "sigmoid":
        return torch.sigmoid(scores)
    if req.normalizer == "hard":
        return score_variants.hard_attention(scores)
    if req.normalizer == "custom":
        return req.custom_fn(scores)
    if req.normalizer == "gumbel":
        return score_variants.gumbel_attention(scores, req.gumbel_temp, req.gumbel_hard, req.sample)
    try:
        import entmax
    except ImportError as e:  # pragma: no cover - an install problem, said plainly
        raise ImportError("entmax attention needs the 'entmax' package: pip install 'x-transformers[sparse]'") from e
    if req.normalizer == "entmax15":
        return entmax.entmax15(scores.float(), dim=-1).to(scores.dtype)
    if req.normalizer == "entmax_bisect":
        return entmax.entmax_bisect(scores.float(), alpha=req.entmax_alpha, dim=-1).to(scores.dtype)
    raise ValueError(f"unknown normalizer {req.normalizer!r}")


class ExplicitBackend:
    """Scores materialised: softmax(mix(q k^T * scale + bias)) v, with every optional step."""

    name = "explicit"

    def not_supported_reasons(self, req: AttendRequest) -> list[str]:
        return []

    def __call__(self, req: AttendRequest):
        q = req.q
        k, v = _expand_kv(req)
        scale = req.scale if req.scale is not None else q.shape[-1] ** -0.5
        scores = torch.einsum("bhnd,bhmd->bhnm", q, k)
        if req.l2_distance:  # -|q - k|^2 = 2 q.k - |q|^2 - |k|^2
            scores = 2 * scores - q.square().sum(-1, keepdim=True) - k.square().sum(-1)[:, :, None, :]
        scores = scores * scale
        if req.prev_scores is not None:  # before bias and head mixing, as upstream's Attend
            scores = scores + req.prev_scores.to(scores.dtype)
        post_scale = score_variants.head_mix(scores, req.scale_mix) if req.scale_mix is not None else None
        if req.bias is not None:
            scores = scores + req.bias.to(scores.dtype)
        if req.pre_mix is not None:
            scores = torch.einsum("bhnm,hg->bgnm", scores, req.pre_mix.to(scores.dtype))
        if req.softclamp is not None:
            scores = softclamp(scores, req.softclamp)
        if req.scores_out is not None:
            req.scores_out.append(scores)
        sign = None
        if req.signed:  # before masking: a masked score must stay at the bottom, not flip to the top
            sign, scores = scores.sign(), scores.abs()
        mask = combined_mask(req)
        keep_rows = None
        cope = req.cope(q, scores, mask) if req.cope is not None else None  # (gates of visible keys only)
        if mask is not None:
            # A large finite value, not -inf: entmax's sort-based threshold would turn -inf into
            # NaN; softmax gives these entries exactly zero weight either way.
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min / 2)
            if cope is not None:
                scores = scores + cope.masked_fill(~mask, 0.0)
            keep_rows = mask.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~keep_rows, 0.0)  # dead rows: finite for every normaliser, zeroed below
        elif cope is not None:
            scores = scores + cope
        if req.selective:
            scores = score_variants.selective_scores(scores, req.mask)
        if req.need_lse and _lse_sink is not None:
            lse = scores.float().logsumexp(dim=-1)  # (b, h, n), pre-softmax: bias, mixing and masks applied
            if req.sink is not None:  # the sink's logit is one more term of the normaliser
                lse = torch.logaddexp(lse, req.sink.float().view(1, -1, 1))
            _lse_sink.append(lse if keep_rows is None else lse * keep_rows[..., 0])  # a row seeing nothing: 0
        if req.need_lse and _max_sink is not None:  # each head's largest visible logit (h,), QK-clip's input
            _max_sink.append(scores.detach().amax(dim=(0, 2, 3)))
        dense = scores  # before top-k (its straight-through gradient is the dense softmax's)
        if req.sparse_topk is not None and req.sparse_topk < scores.shape[-1]:
            kth = scores.topk(req.sparse_topk, dim=-1).values[..., -1:]
            # Ties at the k-th score are all kept, and so are near-ties within a few rounding
            # errors: identical keys computed in different passes (prefill vs a decode step) differ
            # in the last bits, and an exact tie in the full forward would split under a cache.
            # float32 epsilons whatever the dtype: 16 bf16 epsilons are 12% of a score (issue 26)
            slack = torch.finfo(torch.float32).eps * 16 * (1 + kth.abs())
            scores = scores.masked_fill(scores < kth - slack, torch.finfo(scores.dtype).min / 2)
        if req.sink is not None:  # one more softmax column, the learned logit, dropped after normalising
            b, h, n = scores.shape[:3]
            sink = req.sink.abs() if req.signed else req.sink  # (signed: the sink's magnitude competes)
            column = sink.to(scores.dtype).view(1, h, 1, 1).expand(b, h, n, 1)
            scores, dense = torch.cat((column, scores), dim=-1), torch.cat((column, dense), dim=-1)
        if req.inverted:
            attn = score_variants.inverted_weights(scores, mask, req.query_mask, sigmoid=req.normalizer == "sigmoid")
        else:
            attn = _normalize(scores, req)
        if req.topk_straight_through:
            attn = score_variants.straight_through(attn, dense.softmax(dim=-1, dtype=torch.float32).to(attn.dtype))
        if req.sink is not None:
            attn = attn[..., 1:]
        if sign is not None:
            attn = attn * sign
        if req.post_mix is not None:
            attn = torch.einsum("bhnm,hg->bgnm", attn, req.post_mix.to(attn.dtype))
        if post_scale is not None:
            attn = attn * post_scale
        if keep_rows is not None:
            attn = attn * keep_rows.to(attn.dtype)
        weights = attn if req.need_weights else None
        if req.dropout > 0:
            attn = F.dropout(attn, p=req.dropout)
        return attn @ v, weights


# --------------------------------------------------------------------------------------------
# registry and dispatch

BACKENDS: dict[str, object] = {}
_PRIORITY: list[str] = []


def register_backend(backend, *, before: str | None = None):
    """Add a backend; ``before`` places it ahead of a named one in the dispatch order."""
    BACKENDS[backend.name] = backend
    if backend.name in _PRIORITY:
        _PRIORITY.remove(backend.name)
    _PRIORITY.insert(_PRIORITY.index(before) if before in _PRIORITY else len(_PRIORITY), backend.name)


register_backend(SDPABackend())
register_backend(ExplicitBackend())

# Where attend() records the pre-softmax logsumexp while record_logsumexp is active (None: nowhere).
_lse_sink: list | None = None


@contextlib.contextmanager
def record_logsumexp(sink: list):
    """Every attend() in this block computes on the explicit path and appends its scores'
    logsumexp over the keys, (b, h, n), to ``sink`` in call order (the attention z-loss)."""
    global _lse_sink
    previous, _lse_sink = _lse_sink, sink
    try:
        yield sink
    finally:
        _lse_sink = previous


# Where attend() records each head's largest pre-softmax logit while record_logit_maxes is active.
_max_sink: list | None = None


@contextlib.contextmanager
def record_logit_maxes(sink: list):
    """Every attend() in this block computes on the explicit path and appends each head's largest
    visible pre-softmax logit, (h,) detached, to ``sink`` in call order (what QK-clip reads)."""
    global _max_sink
    previous, _max_sink = _max_sink, sink
    try:
        yield sink
    finally:
        _max_sink = previous


# A plain module global, not a ContextVar: torch.compile cannot trace ContextVar.get (a graph
# break in every attention layer), while a global is read at trace time and guarded on.
_forced: str | None = None


@contextlib.contextmanager
def attend_backend(name: str | None):
    """Force a backend for every attend() in this block (tests, benchmarks); None restores auto."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {sorted(BACKENDS)}")
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _auto_reasons(backend, req: AttendRequest) -> list[str]:
    """What rules a backend out of automatic dispatch: it cannot compute ``req``, or (its optional
    ``slower_reasons``) it can but was measured slower than the next one; forcing it ignores the latter."""
    reasons = backend.not_supported_reasons(req)
    return reasons + backend.slower_reasons(req) if hasattr(backend, "slower_reasons") else reasons


def rejection_reasons(req: AttendRequest) -> dict[str, list[str]]:
    """Every registered backend's reasons for not being picked for ``req`` (empty list = can)."""
    return {name: _auto_reasons(BACKENDS[name], req) for name in _PRIORITY}


def choose_backend(req: AttendRequest, force: str | None = None):
    force = _forced or (None if force in (None, "auto") else force)
    if force is not None:
        if force not in BACKENDS:
            raise ValueError(f"unknown attention backend {force!r}; valid: {sorted(BACKENDS)}")
        reasons = BACKENDS[force].not_supported_reasons(req)
        if reasons:
            raise BackendNotSupported(f"backend {force!r} cannot compute this attention: " + "; ".join(reasons))
        return BACKENDS[force]
    for name in _PRIORITY:
        if not _auto_reasons(BACKENDS[name], req):
            return BACKENDS[name]
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejection_reasons(req).items())
    raise BackendNotSupported(f"no attention backend can compute this request ({detail})")


def attend(q: Tensor, k: Tensor, v: Tensor, *, force_backend: str | None = None, **options) -> tuple[Tensor, Tensor | None]:
    """Attention of q (b, h, n, d) over k, v (b, g, m, d|e), g dividing h.

    Options are the fields of :class:`AttendRequest`. Returns (out (b, h, n, e), weights or None);
    weights (b, h, n, m) only when ``need_weights=True``.
    """
    if _lse_sink is not None or _max_sink is not None:
        options["need_lse"] = True
    req = AttendRequest(q=q, k=k, v=v, **options)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    backend = choose_backend(req, force_backend)
    if req.score_mod is not None and not getattr(backend, "reads_score_mod", False):
        dense = req.score_mod.dense()  # only now, and once per forward (memoised)
        req = replace(req, bias=dense if req.bias is None else dense + req.bias, score_mod=None)
    return backend(req)


def log_prob_from_hard_attend(intermediates) -> Tensor:
    """(b, h, n): the log-probability, under the softmax of the logits, of the key each query's one-hot
    weights took (hard or Gumbel attention: a sampled key's log-likelihood, for a policy gradient).
    ``intermediates``: what upstream's ``Attention(..., return_intermediates=True)`` returns."""
    chosen = intermediates.post_softmax_attn.argmax(dim=-1, keepdim=True)
    return intermediates.pre_softmax_attn.log_softmax(dim=-1).gather(-1, chosen)[..., 0]


__all__ = ["attend", "log_prob_from_hard_attend", "attend_backend", "AttendRequest", "BackendNotSupported", "BACKENDS", "register_backend",
           "record_logsumexp", "record_logit_maxes", "rejection_reasons", "choose_backend", "causal_mask", "combined_mask", "softclamp",
           "window_mask"]
