"""How scores become weights, beyond softmax: the variants the explicit backend of ``attend()``
computes for upstream's ``attn_hard``, ``attn_gumbel_softmax``, ``attn_sparse_topk_straight_through``,
``attn_selective``, ``attn_inverted_attention`` and ``attn_pre_scale_post_talking_heads``.

Each is a function of the score matrix (all need it, so SDPA and flex decline them: see
``attend.score_matrix_reasons``). Masked scores arrive filled with a large negative finite value.

Legend: b batch, h heads, n queries, m keys (the first m - n an always-visible prefix: memory or
zero key/values; no cache, where these apply).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot_argmax(scores: Tensor) -> Tensor:
    """(..., m) -> one-hot of each row's largest score (the first on ties)."""
    return torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)


def straight_through(forward: Tensor, soft: Tensor) -> Tensor:
    """``forward``'s values with ``soft``'s gradient (the straight-through estimator)."""
    return forward.detach() + soft - soft.detach()


def hard_attention(scores: Tensor) -> Tensor:
    """attn_hard: each query takes the value of its largest score; the gradient is softmax's."""
    return straight_through(one_hot_argmax(scores), scores.softmax(dim=-1))


def gumbel_attention(scores: Tensor, temp: float, hard: bool, sample: bool) -> Tensor:
    """attn_gumbel_softmax (1611.01144): softmax((scores + Gumbel noise) / temp), one-hot with a
    straight-through gradient when ``hard``. ``sample=False`` (eval mode) drops the noise: the
    weights become the deterministic mode, softmax(scores / temp), or its argmax when hard."""
    if sample:
        return F.gumbel_softmax(scores, tau=temp, hard=hard, dim=-1)
    soft = (scores / temp).softmax(dim=-1)
    return straight_through(one_hot_argmax(scores), soft) if hard else soft


def selective_scores(scores: Tensor, key_mask: Tensor | None) -> Tensor:
    """Selective attention (2410.02703, section 3.3): scores - F, where F[i, j] sums, over the earlier
    queries i' < i, relu(head 0's score of i' for key j): a token can hide a key from every later query.

    A token never hides itself, nor the prefix keys, nor the row's first kept token (its start,
    as upstream's unmasked sos); a padding token hides nothing. key_mask: (b, 1, 1|n, m) bool or None."""
    n, m = scores.shape[-2:]
    start = m - n
    gate = scores[:, 0].float().relu()  # (b, n, m): masked scores are very negative, so 0
    j = torch.arange(m, device=scores.device)
    i = torch.arange(n, device=scores.device)[:, None]
    if key_mask is None:
        first = torch.full((1, 1), start, device=scores.device)
    else:  # the first kept key after the prefix, per row
        first = key_mask[:, 0, -1:, start:].long().argmax(dim=-1) + start  # (b, 1)
    exempt = (j < start) | (j == i + start) | (j == first[:, :, None])  # (b|1, n, m)
    gate = gate.masked_fill(exempt, 0.0)
    if key_mask is not None:  # a padding token hides nothing
        gate = gate.masked_fill(~key_mask[:, 0, -1, start:, None], 0.0)
    hidden = F.pad(gate, (0, 0, 1, -1)).cumsum(dim=-2)  # row i: the sum over rows i' < i
    return scores - hidden[:, None].to(scores.dtype)


def inverted_weights(scores: Tensor, mask: Tensor | None, query_mask: Tensor | None, sigmoid: bool = False) -> Tensor:
    """Inverted attention (cross-attention): each key's scores normalised over the queries (a
    softmax down the column: keys compete for queries), then each query's weights L1-normalised over
    the keys it may see. query_mask: (b, n) bool, padded queries take no share. ``sigmoid``: the
    elementwise sigmoid in place of the softmax over the queries (upstream's pairing with attn_sigmoid)."""
    low = torch.finfo(scores.dtype).min / 2
    if query_mask is not None:
        scores = scores.masked_fill(~query_mask[:, None, :, None], low)
    attn = scores.sigmoid() if sigmoid else scores.softmax(dim=-2, dtype=torch.float32).to(scores.dtype)
    if mask is not None:
        attn = attn * mask.to(attn.dtype)
    return attn / attn.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def head_mix(scores: Tensor, mix: Tensor) -> Tensor:
    """(b, h, n, m) mixed across heads by mix (h, h): out[g] = sum_h scores[h] mix[h, g]."""
    return torch.einsum("bhnm,hg->bgnm", scores, mix.to(scores.dtype))
