"""Positions computed from the content: terms of the attention scores that depend on the tokens.

- :class:`CoPE`, contextual position encoding (``attn_use_cope``, Golovneva et al. 2024,
  2405.18719): a query counts the keys between a key and itself that its gates open,
  ``p_ij = sum_{k >= j} sigmoid(s_ik)`` over the visible keys k, and adds ``q_i . e[p_ij]``
  (e learned, interpolated between integer positions) to the score. Needs the score matrix.
- :class:`ForgetBias`, the forgetting transformer's bias (``attn_data_dependent_alibi``, Lin et al.
  2025, 2503.02130): a learned forget gate f_t = sigmoid(w . x_t + b) per head and token; the score
  of key j at query i gets ``sum_{j < t <= i} log f_t``, a cumulative sum of log gates (ALiBi whose
  slope is read from the data). Causal: the running sums of the keys live in the cache.
  Bidirectional (an encoder): a second set of gates for keys after the query.
- :class:`PerRowForgetBias` (``attn_data_dependent_alibi_per_row``): the gate of token t as seen by
  query i, ``log sigmoid(q'_i . k'_t / sqrt(d'))`` from small (d' wide) projections, summed over
  ``j <= t < i``. Causal only; the cache keeps the small keys.

Legend: b batch, h heads, n queries, m keys, d head dim, P CoPE's positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

COPE_SOFT_TEMP = 5e-2  # the soft one-hot's temperature over integer positions (upstream's)


class CoPE(nn.Module):
    """q_i . e[p_ij] for the scores s (b, h, n, m) of queries q (b, h, n, d); ``mask`` (bool,
    broadcastable to the scores) the visible keys, whose gates alone count."""

    def __init__(self, heads: int, dim_head: int, max_pos: int, *, soft_onehot: bool = False,
                 talking_heads: bool = False):
        super().__init__()
        self.max_pos = max_pos
        self.pos_emb = nn.Parameter(torch.zeros(max_pos, dim_head))  # zero: no position term at init
        self.soft_onehot = soft_onehot
        # (talking heads) the gates read a head mix of the scores, (h_out, h_in) as a 1x1 convolution's
        self.mix = nn.Parameter(torch.empty(heads, heads)) if talking_heads else None
        self.reset_parameters()

    def reset_parameters(self):
        if self.mix is not None:
            nn.init.kaiming_uniform_(self.mix, a=math.sqrt(5))  # nn.Conv2d's default, bound 1 / sqrt(h)

    def positions(self, scores, mask=None):
        """p (b, h, n, m): the sum of the gates of the visible keys from j onwards, at most max_pos - 1."""
        if self.mix is not None:
            scores = torch.einsum("bhnm,gh->bgnm", scores, self.mix.to(scores.dtype))
        gates = torch.sigmoid(scores)
        if mask is not None:
            gates = gates * mask.to(gates.dtype)
        return gates.flip(-1).cumsum(dim=-1).flip(-1).clamp(max=self.max_pos - 1)

    def forward(self, q, scores, mask=None):
        pos = self.positions(scores, mask)
        at = torch.einsum("bhnd,pd->bhnp", q, self.pos_emb.to(q.dtype))  # q_i . e[p] for every integer p
        if self.soft_onehot:  # a softmax over integer positions near p instead of linear interpolation
            grid = torch.arange(self.max_pos, device=q.device, dtype=pos.dtype)
            w = (-(pos[..., None] - grid).abs() / COPE_SOFT_TEMP).softmax(dim=-1)  # (b, h, n, m, P)
            return torch.einsum("bhnmp,bhnp->bhnm", w, at)
        lo, hi = pos.floor(), pos.ceil()
        frac = pos - lo  # the gradient reaches the gates through the fraction
        at_lo, at_hi = at.gather(-1, lo.long()), at.gather(-1, hi.long())
        return at_lo + frac * (at_hi - at_lo)


class ForgetBias(nn.Module):
    """The forgetting transformer's bias (b, h, n, m) from the block's input x (b, n, dim)."""

    def __init__(self, dim: int, heads: int, *, causal: bool, bias_init: float = 5.0, post_log_scale: float = 1.0):
        super().__init__()
        self.causal, self.heads = causal, heads
        self.bias_init, self.post_log_scale = bias_init, post_log_scale
        self.to_gates = nn.Linear(dim, heads * (1 if causal else 2))  # (a second set: keys after the query)
        self.reset_parameters()

    def reset_parameters(self):
        # gates start near open (sigmoid(5) = 0.993): a slow forgetting, as the paper's init
        nn.init.constant_(self.to_gates.bias, self.bias_init)

    def log_gates(self, x):
        """(b, H, n): log f_t, scaled."""
        return (F.logsigmoid(self.to_gates(x)) * self.post_log_scale).transpose(1, 2)

    def forward(self, x, cache=None, mask=None):
        """mask: the block's key mask (b, 1, 1|n, m) or None; a padded token's gate is 1 (log 0), so padding
        between a query and a key (after memory tokens, say) forgets nothing."""
        logf = self.log_gates(x)
        keep = token_keep(mask, x.shape[1], cache)
        if keep is not None:
            logf = logf * keep[:, None, :].to(logf.dtype)
        if not self.causal:
            fwd, bwd = logf.cumsum(dim=-1).chunk(2, dim=1)  # (b, h, n) each
            lower = fwd[..., :, None] - fwd[..., None, :]  # keys before the query: sum over (j, i]
            upper = bwd[..., None, :] - bwd[..., :, None]  # keys after: sum over (i, j] of the second gates
            n = x.shape[1]
            below = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            return torch.where(below, lower, upper)
        total = logf.cumsum(dim=-1)  # (b, h, n)
        if cache is not None:
            prev = cache.get_state("forget_total")  # the running sum up to the last cached token
            if prev is not None:
                total = total + prev
            cache.set_state("forget_total", total[..., -1:])
            keys = cache.append_extra("forget_sums", total[..., None])[..., 0]  # (b, h, m)
        else:
            keys = total
        return total[..., :, None] - keys[..., None, :]  # (b, h, n, m); keys ahead are masked by causality


class PerRowForgetBias(nn.Module):
    """Per-row gates: the bias (b, h, n, m) from small queries and keys of x (b, n, dim)."""

    def __init__(self, dim: int, heads: int, *, dim_head: int = 8, post_log_scale: float = 1.0):
        super().__init__()
        self.heads, self.dim_head, self.post_log_scale = heads, dim_head, post_log_scale
        self.to_qk = nn.Linear(dim, heads * dim_head * 2, bias=False)

    def forward(self, x, cache=None, mask=None):
        b, n, _ = x.shape
        q, k = self.to_qk(x).view(b, n, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # (b, h, n, d') each
        if cache is not None:
            k = cache.append_extra("forget_keys", k)  # (b, h, m, d')
        m = k.shape[-2]
        gates = F.logsigmoid(q @ k.transpose(-1, -2) * self.dim_head ** -0.5) * self.post_log_scale  # (b, h, n, m)
        first = cache.query_offset(n, m) if cache is not None else m - n  # where the new queries sit among the keys
        q_idx = first + torch.arange(n, device=x.device)
        before = torch.arange(m, device=x.device)[None, :] < q_idx[:, None]  # (n, m): tokens t < i
        gates = gates * before.to(gates.dtype)
        if mask is not None:  # a padded token's gate is 1 (log 0)
            gates = gates * mask.to(gates.dtype)
        return gates.flip(-1).cumsum(dim=-1).flip(-1)  # sum over j <= t < i


def token_keep(mask, n: int, cache=None):
    """(b, n) bool: the new tokens kept, read from a key mask (b, 1, 1|n, m) at each token's own key
    (the last n keys, or the static cache's slots), or None."""
    if mask is None:
        return None
    b, m = mask.shape[0], mask.shape[-1]
    first = cache.query_offset(n, m) if cache is not None else m - n
    own = (first + torch.arange(n, device=mask.device)).view(1, n, 1).expand(b, n, 1)
    return mask[:, 0].expand(b, n, m).gather(-1, own)[..., 0]


def build_forget_bias(cfg, dim: int, heads: int, causal: bool):
    """The forgetting transformer's bias module ``cfg`` asks for (an AttentionConfig), or None."""
    if not cfg.data_dependent_alibi:
        return None
    kw = dict(cfg.data_dependent_alibi_kwargs)
    if cfg.data_dependent_alibi_per_row:
        return PerRowForgetBias(dim, heads, dim_head=cfg.data_dependent_alibi_per_row_dim_head, **kw)
    return ForgetBias(dim, heads, causal=causal, **kw)


FORGET_KWARGS = {"bias_init", "post_log_scale"}  # what attn_data_dependent_alibi_kwargs may set
PER_ROW_KWARGS = {"post_log_scale"}


def check_config(cfg, positive_int, positive_number):
    """The checks of AttentionConfig's content-position and hybrid keywords (config.py calls this)."""
    from torch import nn

    positive_int("attn_cope_max_pos", cfg.cope_max_pos)
    positive_int("attn_data_dependent_alibi_per_row_dim_head", cfg.data_dependent_alibi_per_row_dim_head)
    allowed = PER_ROW_KWARGS if cfg.data_dependent_alibi_per_row else FORGET_KWARGS
    for key, value in cfg.data_dependent_alibi_kwargs.items():
        if key not in allowed:
            raise ValueError(f"attn_data_dependent_alibi_kwargs: unknown key {key!r}; valid: {sorted(allowed)}")
        if key == "post_log_scale":
            positive_number(f"attn_data_dependent_alibi_kwargs[{key!r}]", value)
        elif not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            raise ValueError(f"attn_data_dependent_alibi_kwargs[{key!r}] must be a finite number, got {value!r}")
    if cfg.hybrid_module is not None and not isinstance(cfg.hybrid_module, nn.Module):
        raise ValueError(f"attn_hybrid_module must be an nn.Module, got {cfg.hybrid_module!r}")
    positive_int("attn_hybrid_fold_axial_dim", cfg.hybrid_fold_axial_dim, allow_none=True)
    if cfg.hybrid_module is None:
        for sub, default in (("hybrid_mask_kwarg", None), ("hybrid_fold_axial_dim", None), ("hybrid_learned_mix", False)):
            if getattr(cfg, sub) != default:
                raise ValueError(f"attn_{sub} configures attn_hybrid_module, which is not given; give the module "
                                 f"too, or drop attn_{sub}")
    if cfg.hybrid_mask_kwarg is not None and not (isinstance(cfg.hybrid_mask_kwarg, str)
                                                  and cfg.hybrid_mask_kwarg.isidentifier()):
        raise ValueError(f"attn_hybrid_mask_kwarg must name a keyword argument, got {cfg.hybrid_mask_kwarg!r}")
