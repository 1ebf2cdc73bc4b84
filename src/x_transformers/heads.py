"""What ``TransformerWrapper`` puts around the stack besides the token embedding: pooling (a [CLS]
token, a masked mean, attention pooling), the output head's variants (several heads, a mixture
of softmaxes, sigsoftmax) and the attention z-loss. Upstream x-transformers' keyword names.

Legend: b batch, n tokens, C [CLS] tokens, q pooled queries, k mixture components, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import AttentionConfig


def masked_mean(x, mask=None):
    """x (b, n, d), mask (b, n) bool (True = keep) -> (b, d): the mean over kept tokens (a row with
    none kept gives zeros)."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class AttentionPool(nn.Module):
    """Learned queries cross-attending to the final hidden states (Set Transformer's PMA,
    1810.00825): ``num_pooled_tokens`` vectors per sequence. Depth 1 is one cross-attention; deeper
    pools are a :class:`CrossAttender` (cross-attention and feed-forward blocks, pre-norm)."""

    def __init__(self, dim: int, dim_context: int, *, num_pooled_tokens: int = 1, depth: int = 1, heads: int = 8,
                 dim_head: int = 64):
        super().__init__()
        from .layers import CrossAttender  # the layers import the wrapper's modules' configs

        self.queries = nn.Parameter(torch.randn(num_pooled_tokens, dim) * 1e-2)
        if depth > 1:
            self.pooler = CrossAttender(dim, depth, heads, attn_dim_head=dim_head, dim_context=dim_context)
        else:
            self.pooler = Attention(dim, heads, AttentionConfig(dim_head=dim_head), cross=True, dim_context=dim_context)

    def forward(self, context, mask=None):
        """context (b, n, dim_context), mask (b, n) -> pooled (b, q, dim)."""
        queries = self.queries.to(context.dtype).expand(context.shape[0], -1, -1)
        if isinstance(self.pooler, Attention):
            key_mask = mask[:, None, None, :] if mask is not None else None
            return self.pooler(queries, context, mask=key_mask)[0]
        return self.pooler(queries, context=context, context_mask=mask)


def calc_z_loss(logsumexps: list, weight: float):
    """Upstream's attention z-loss (2202.08906's router z-loss on attention logits, as PaLM): the
    per-layer logsumexp of the pre-softmax scores (b, h, n) summed over layers, squared, summed
    over heads, averaged over batch and positions, times ``weight``."""
    if not logsumexps:
        raise ValueError("return_attn_z_loss: this stack ran no attention")
    if len({tuple(t.shape) for t in logsumexps}) > 1:
        raise ValueError("return_attn_z_loss sums every layer's logsumexp: the layers' (b, h, n) shapes differ")
    lse = torch.stack(logsumexps).sum(dim=0)
    return lse.square().sum(dim=1).mean() * weight


def output_heads(dim: int, logits_dim: int, num_heads: int):
    """The untied output head: one (dim -> logits_dim) linear layer, or a ModuleList of them."""
    heads = [nn.Linear(dim, logits_dim, bias=False) for _ in range(num_heads)]
    for head in heads:
        nn.init.normal_(head.weight, std=0.02)
    return heads[0] if num_heads == 1 else nn.ModuleList(heads)


class Mixture(nn.Module):
    """Mixture of softmaxes (1711.03953): k hidden states per position and their weights."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.to_mixture = nn.Linear(dim, dim * k, bias=False)
        self.combine_mixture = nn.Linear(dim, k, bias=False)

    def forward(self, hidden):
        """hidden (..., dim) -> (hidden (..., k, dim), weights (..., k) in float32)."""
        weights = self.combine_mixture(hidden).float().softmax(dim=-1)
        return self.to_mixture(hidden).unflatten(-1, (self.k, -1)), weights


def finish_logits(logits, *, mixture_weights=None, sigsoftmax: bool = False, squeeze: bool = False):
    """One head's raw logits -> what forward returns: sigsoftmax (1805.10829) adds
    log sigmoid(logits); a mixture (..., k, v) becomes log sum_k w_k softmax(logits_k) (float32
    log-probabilities); ``squeeze`` drops a last dimension of 1."""
    if sigsoftmax:
        logits = logits + F.logsigmoid(logits)
    if mixture_weights is not None:
        logits = (logits.float().log_softmax(dim=-1) + mixture_weights.log()[..., None]).logsumexp(dim=-2)
    if squeeze and logits.shape[-1] == 1:
        logits = logits[..., 0]
    return logits


POOLING = ("use_cls_token", "average_pool_embed", "attn_pool")  # alternatives: conflicts.POOLING


def next_embed_head(dim: int) -> nn.Module:
    """Upstream's continuous next-embedding head (``add_continuous_pred_head``): final hidden states
    (..., dim) -> a prediction of the next token's input embedding, bias-free Linear, SiLU, Linear
    (trained by ``AutoregressiveWrapper``'s L1 loss, weight ``next_embed_loss_weight``)."""
    return nn.Sequential(nn.Linear(dim, dim, bias=False), nn.SiLU(), nn.Linear(dim, dim, bias=False))
