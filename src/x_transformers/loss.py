"""Next-token cross-entropy for large vocabularies without the full logits.

``F.cross_entropy(hidden @ weight.T, targets)`` materialises a (tokens, vocab) logit matrix, and
under bf16 autocast usually a float32 copy of it, its log-softmax and their gradients: for the
GPT-2-small training shape (16 x 1024 tokens, vocab 50304) that is several 3.3 GB tensors and
about a sixth of the step's GPU time. :func:`chunked_cross_entropy` computes the same mean loss
chunk by chunk of tokens and, in the same pass, the gradients with respect to the hidden states
and the head weight, so only one chunk's logits ever exist and backward is two scalings.

Legend: N tokens, C tokens of one chunk, d model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# A chunk's float32 log-probabilities are at most this many elements (1 GiB).
CHUNK_ELEMENTS = 2 ** 28


def _chunk_rows(n: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size!r}")
        return chunk_size
    # equal chunks (better matrix products than a full-size run and a ragged tail)
    pieces = max(1, math.ceil(n * vocab / CHUNK_ELEMENTS))
    return max(1, math.ceil(n / pieces))


def chunk_step(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk: (sum of -log p[target] over valid rows, softmax - onehot(target) in the logits'
    dtype). Written as plain elementwise + row reductions so a compiler fuses it into two passes
    over the (C, V) logits (the eager path in _ChunkedCrossEntropy makes about five)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -(logp.gather(1, targets[:, None]).squeeze(1) * valid).sum()
    cols = torch.arange(logits.shape[-1], device=logits.device)
    g = logp.exp() - (cols[None, :] == targets[:, None]).to(torch.float32)
    return nll, g.to(logits.dtype)


_COMPILED: dict[str, object] = {}


def _fused_step(logits: Tensor):
    """The compiled chunk_step on CUDA (inductor), None elsewhere or if it cannot be built; it is
    compiled once per process and falls back to the eager loop on any compile failure."""
    if not logits.is_cuda or torch.compiler.is_compiling():
        return None
    fn = _COMPILED.get("cuda")
    if fn is None:
        try:
            fn = torch.compile(chunk_step, dynamic=False)
        except Exception:  # noqa: BLE001 - no compiler available: the eager loop is exact too
            fn = False
        _COMPILED["cuda"] = fn
    if fn is False:
        return None

    def run(logits, targets, valid):
        try:
            return fn(logits, targets, valid)
        except Exception:  # noqa: BLE001 - a failed inductor build is remembered, not retried
            _COMPILED["cuda"] = False
            return chunk_step(logits, targets, valid)
    return run


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_rows: int,
                compute_dtype: torch.dtype):
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)  # (N, d)
        t = targets.reshape(-1)  # (N,)
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        valid = t != ignore_index
        safe_t = torch.where(valid, t, torch.zeros_like(t))  # ignored rows read class 0, then count zero
        count = valid.sum().to(torch.float32)
        inv = 1.0 / count  # inf when every target is ignored: loss NaN, grads zero, as F.cross_entropy
        row_scale = torch.where(valid, inv, torch.zeros_like(inv))  # (N,) float32

        with torch.autocast(hidden.device.type, enabled=False):
            hc, wc = h.to(compute_dtype), weight.to(compute_dtype)  # one cast of each, not one per chunk
            loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            for start in range(0, n, chunk_rows):
                sl = slice(start, start + chunk_rows)
                hs, ts, vs = hc[sl], safe_t[sl], valid[sl]
                logits = hs @ wc.t()  # (C, V) in the compute dtype
                fused = _fused_step(logits) if (need_h or need_w) else None
                if fused is not None:  # CUDA: log-softmax, loss and softmax - onehot in two fused passes
                    nll, g = fused(logits, ts, vs)
                    loss_sum = loss_sum + nll
                    del logits
                else:
                    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (C, V) float32, one kernel
                    del logits
                    loss_sum = loss_sum - (logp.gather(1, ts[:, None]).squeeze(1) * vs).sum()
                    if not (need_h or need_w):
                        continue
                    # d loss_i / d logits_i = softmax_i - onehot(t_i), scaled by 1/count below, in fp32
                    # on the small (C, d) / (V, d) results rather than on the (C, V) matrix
                    g = torch.empty(logp.shape, dtype=compute_dtype, device=h.device)
                    torch.exp(logp, out=g)
                    del logp
                    g.scatter_add_(1, ts[:, None], torch.full_like(ts[:, None], -1, dtype=compute_dtype))
                if need_h:
                    grad_h[sl] = (g @ wc).float() * row_scale[sl, None]
                if need_w:
                    masked = hs * vs[:, None].to(compute_dtype)  # ignored rows add nothing (exact 0/1)
                    grad_w += (g.t() @ masked).float()
            loss = loss_sum / count
            if need_w:
                grad_w = (grad_w * torch.where(count > 0, inv, 0.0)).to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_shape = hidden.shape
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h * grad_loss).view(ctx.hidden_shape) if grad_h is not None else None
        gw = grad_w * grad_loss if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                          chunk_size: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, never building them.

    hidden (..., d), weight (V, d) (a TransformerWrapper's ``logits_weight``), targets (...) long
    with ``ignore_index`` for positions that do not count. Equal to
    ``F.cross_entropy((hidden @ weight.T).flatten(0, -2), targets.flatten(), ignore_index=...)``
    in value and gradients. Under autocast the products run in the autocast dtype and the
    log-softmax, loss and weight-gradient sums in float32. ``chunk_size`` tokens per chunk; the
    default keeps a chunk's float32 log-probabilities within 1 GiB.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden {tuple(hidden.shape)} without its last dim")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    rows = _chunk_rows(targets.numel(), weight.shape[0], chunk_size)
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, ignore_index, rows, compute_dtype)


def head_weight(net) -> Tensor | None:
    """A TransformerWrapper's (vocab, dim) head weight when its logits are exactly
    ``hidden_states @ weight.T`` (times ``logits_scale``), so the loss can be fused with the head;
    None where they are more than that (a custom or biased head, several heads, a mixture of
    softmaxes, sigsoftmax, a squeezed last dimension, no head): then the plain loss on the logits."""
    if net.cfg.squeeze_out_last_dim:
        return None
    head = net.to_logits
    if head is not None and not (type(head) is torch.nn.Linear and head.bias is None):
        return None
    try:
        return net.logits_weight
    except ValueError:
        return None


__all__ = ["chunked_cross_entropy", "head_weight"]
