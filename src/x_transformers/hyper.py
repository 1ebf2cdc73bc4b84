"""Hyper-connections (2409.19606, dynamic variant of its Algorithm 2) with the residual mixing
kept doubly stochastic by Sinkhorn-Knopp (mHC, 2512.24880).

The stack carries s residual streams instead of one: x (b, n, d) becomes (b, n, s, d) (plus a
learned per-stream embedding) before the first block, and their sum is taken after the last.
Each block reads one mixture of the streams, and writes its output back into every stream,
weighted per stream, after the streams were mixed among themselves:

    branch input  h = sum_s a_s R_s                       a = sigmoid(static + dynamic), (s,)
    new streams   R'_t = sum_s M_st R_s + b_t f(h)        M = sinkhorn(static + dynamic), (s, s)
                                                          b = 2 sigmoid(static + dynamic), (s,)

the dynamic parts being small linear functions of the (LayerNorm-ed) streams at each token.
With one stream the stack is the plain residual one (this module is not used).

With ``qkv_receive_diff_residuals`` a self-attention block reads three mixtures instead of one
(three read columns a): its queries, keys and values each from their own, as a (3, b, n, d) input.

LIMe (2502.09245, dynamic variant; ``integrate_layers``) routes across depth instead: block l's
branch reads ``sum_k w_k h_k`` over the inputs h_0..h_l of blocks 0..l, the weights
``softmax(W rmsnorm(h_l))`` per token (ReLU with ``layer_integrate_use_softmax=False``); a
self-attention block after the first reads three such mixtures, one each for q, k and v.
Aggregated residuals (``attn_aggregated_residuals``, 2601.21582 / 2603.15031) weigh the same inputs
by attention instead: ``softmax_k(q . rmsnorm(h_k) / sqrt(d))``, the query ``rmsnorm(h_l + U D h_l')``
a low-rank, zero-initialised correction of the block's own input (h_l' = rmsnorm(h_l)).

Legend: b batch, n tokens, s streams, d dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adaptive import apply_norm
from .residual import Residual


def sinkhorn(logits, iters: int):
    """A doubly stochastic matrix from (..., s, s) logits: a softmax over the rows' index, then
    ``iters`` alternations of row and column L1 normalisation (in float32)."""
    m = logits.float().softmax(dim=-2)
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)
        m = m / m.sum(dim=-2, keepdim=True)
    return m.to(logits.dtype)


class HyperResidual(Residual):
    """A :class:`Residual` (the same norm placement and branch options) over s residual streams.

    ``layer_index``: the block's index in the stack; at init block l reads stream l mod s most
    (its static input weight starts at 1, the others at 0, before the sigmoid).
    """

    def __init__(self, fn: nn.Module, *, streams: int, layer_index: int, sinkhorn_iters: int, dim: int,
                 views: int = 1, **kwargs):
        super().__init__(fn, dim=dim, **kwargs)
        self.streams, self.sinkhorn_iters, self.views = streams, sinkhorn_iters, views
        self.norm = nn.LayerNorm(dim, bias=False)
        read = torch.zeros(streams, views)  # views: 3 reads (q, k, v) under qkv_receive_diff_residuals
        read[layer_index % streams] = 1.0
        self.static_alpha = nn.Parameter(torch.cat((read, torch.eye(streams)), dim=1))  # (s, v + s)
        self.dynamic_alpha = nn.Parameter(torch.zeros(dim, views + streams))
        self.dynamic_alpha_scale = nn.Parameter(torch.tensor(1e-2))
        self.static_beta = nn.Parameter(torch.ones(streams))
        self.dynamic_beta = nn.Parameter(torch.zeros(dim))
        self.dynamic_beta_scale = nn.Parameter(torch.tensor(1e-2))

    def width(self, x):
        """x (b, n, s, d) -> branch input (b, n, d) (with views: (v, b, n, d)), mixed streams (b, n, s, d),
        write weights (b, n, s)."""
        v = self.views
        normed = self.norm(x)
        alpha = normed @ self.dynamic_alpha * self.dynamic_alpha_scale + self.static_alpha  # (b, n, s, v + s)
        read = torch.sigmoid(alpha[..., :v])  # (b, n, s, v)
        mix = sinkhorn(alpha[..., v:], self.sinkhorn_iters)  # (b, n, s, s), [source, target]
        dyn = torch.sigmoid(normed @ self.dynamic_beta) * 2 * self.dynamic_beta_scale  # (b, n, s)
        write = torch.sigmoid(dyn + self.static_beta) * 2
        h = torch.einsum("bnsv,bnsd->vbnd", read, x)
        h = h[0] if v == 1 else h
        mixed = torch.einsum("bnst,bnsd->bntd", mix, x)
        return h, mixed, write

    def forward(self, x, *args, **kwargs):
        """x (b, n, s, d) -> (new streams, whatever f returned beside its output, or None)."""
        h, mixed, write = self.width(x)
        out, extra = self.branch(h, *args, **kwargs)
        if out is None:
            return x, None  # layer dropout skips the whole layer, its stream mixing included
        x = mixed + write[..., None] * out[..., None, :]
        if self.post_norm is not None:
            x = apply_norm(self.post_norm, x, kwargs.get("condition"))
        return x, extra

    def extra_repr(self):
        views = f", views={self.views}" if self.views > 1 else ""
        return super().extra_repr() + f", streams={self.streams}, sinkhorn_iters={self.sinkhorn_iters}{views}"


class LayerIntegration(nn.Module):
    """LIMe's dynamic router (2502.09245): block ``layers - 1``'s branch input as a per-token mixture of
    the inputs of blocks 0..layers - 1. ``views`` mixtures (3: a self-attention's q, k, v inputs)."""

    def __init__(self, dim: int, layers: int, *, views: int = 1, use_softmax: bool = True, make_norm=None):
        super().__init__()
        self.layers, self.views, self.use_softmax = layers, views, use_softmax
        self.norm = make_norm()  # an RMSNorm, as upstream's
        self.to_weights = nn.Linear(dim, views * layers)

    def forward(self, x, inputs: list):
        """x (b, n, d) this block's input (the last of ``inputs``, h_0..h_l each (b, n, d))
        -> (b, n, d), or (views, b, n, d)."""
        if len(inputs) != self.layers:
            raise RuntimeError(f"integrate_layers: block expects {self.layers} earlier inputs, got {len(inputs)}")
        logits = self.to_weights(self.norm(x)).unflatten(-1, (self.views, self.layers))  # (b, n, v, l)
        w = logits.softmax(dim=-1) if self.use_softmax else F.relu(logits)
        out = torch.einsum("lbnd,bnvl->vbnd", torch.stack(inputs), w)
        return out[0] if self.views == 1 else out

    def extra_repr(self):
        return f"layers={self.layers}, views={self.views}" + ("" if self.use_softmax else ", relu")


class GatedMultiResidual(Residual):
    """Gated multi-stream residual (upstream's ``gated_multi_residual``, after Qwen's gated residual):
    s streams, no mixing among them. A block reads an elementwise-gated mean of the normalised
    streams and writes its output into each with a scalar gate:

        normed  N_s = rmsnorm(R_s) * g_s                     g (s, d) from 1, no other pre-norm
        z       = silu(W_z [N_1 .. N_s] / s) * c             a shared rank-r bottleneck, c from 1e-2
        read    h = sum_s sigmoid(W_r z + a_s) * N_s / s      a (s, d) from 1 on stream l mod s, else 0
        write   R'_s = R_s + 2 sigmoid(W_w z + b_s) f(h)      W_r, W_w, b from 0: a write weight of 1

    ``read_gate_rank`` r (residual_fn_kwargs, required, as upstream's).
    """

    def __init__(self, fn: nn.Module, *, streams: int, layer_index: int, read_gate_rank: int, dim: int, **kwargs):
        super().__init__(fn, dim=dim, **kwargs)
        self.pre_norm = None  # the read normalises
        self.streams, self.layer_index = streams, layer_index
        self.read_gain = nn.Parameter(torch.ones(streams, dim))
        self.static_read = nn.Parameter(torch.zeros(streams, dim))
        self.static_write = nn.Parameter(torch.zeros(streams))
        self.to_bottleneck = nn.Linear(dim * streams, read_gate_rank, bias=False)
        self.to_read = nn.Linear(read_gate_rank, dim * streams, bias=False)
        self.to_write = nn.Linear(read_gate_rank, streams, bias=False)
        self.dynamic_scale = nn.Parameter(torch.tensor(1e-2))
        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        with torch.no_grad():
            self.static_read.zero_()
            self.static_read[self.layer_index % self.streams] = 1.0
        nn.init.zeros_(self.to_read.weight)
        nn.init.zeros_(self.to_write.weight)

    def forward(self, x, *args, **kwargs):
        """x (b, n, s, d) -> (new streams, whatever f returned beside its output, or None)."""
        b, n, s, d = x.shape
        normed = F.rms_norm(x, (d,), eps=torch.finfo(x.dtype).eps) * self.read_gain  # (b, n, s, d)
        z = F.silu(self.to_bottleneck(normed.reshape(b, n, s * d) / s)) * self.dynamic_scale  # (b, n, r)
        read = torch.sigmoid(self.to_read(z).view(b, n, s, d) + self.static_read)
        h = (read * normed).sum(dim=-2) / s  # (b, n, d)
        out, extra = self.branch(h, *args, **kwargs)
        if out is None:
            return x, None
        write = torch.sigmoid(self.to_write(z) + self.static_write) * 2  # (b, n, s)
        x = x + write[..., None] * out[..., None, :]
        if self.post_norm is not None:
            x = apply_norm(self.post_norm, x, kwargs.get("condition"))
        return x, extra

    def extra_repr(self):
        return super().extra_repr() + f", streams={self.streams}, rank={self.to_bottleneck.out_features}"


class AttentionIntegration(nn.Module):
    """Aggregated residuals' router (upstream's ``attn_aggregated_residuals``, 2601.21582, 2603.15031):
    block ``layers - 1``'s branch input as an attention-weighted sum of the inputs of blocks
    0..layers - 1, its query the block's own input through a low-rank correction (``lora_rank``,
    SiLU or another ``lora_activation`` between the two projections; the up projection starts at 0)."""

    def __init__(self, dim: int, layers: int, *, make_norm, lora_rank: int = 64, lora_activation=None):
        super().__init__()
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or not 0 < lora_rank < dim:
            raise ValueError(f"attn_aggregated_residual_kwargs: lora_rank must be an int in 1..{dim - 1} (below dim), "
                             f"got {lora_rank!r}")
        if lora_activation is not None and not callable(lora_activation):
            raise ValueError(f"attn_aggregated_residual_kwargs: lora_activation must be callable or None, "
                             f"got {lora_activation!r}")
        self.layers, self.activation = layers, lora_activation
        self.key_norm, self.query_in_norm, self.query_norm = make_norm(), make_norm(), make_norm()
        self.down = nn.Linear(dim, lora_rank, bias=False)
        self.up = nn.Linear(lora_rank, dim, bias=False)
        self.reset_variant_parameters()

    def reset_variant_parameters(self):
        nn.init.zeros_(self.up.weight)

    def forward(self, x, inputs: list):
        """x (b, n, d) this block's input (the last of ``inputs``) -> (b, n, d)."""
        if len(inputs) != self.layers:
            raise RuntimeError(f"attn_aggregated_residuals: block expects {self.layers} earlier inputs, got {len(inputs)}")
        stacked = torch.stack(inputs)  # (l, b, n, d)
        low = self.down(self.query_in_norm(x))
        q = self.query_norm(x + self.up(low if self.activation is None else self.activation(low)))
        logits = torch.einsum("bnd,lbnd->lbn", q, self.key_norm(stacked)) * x.shape[-1] ** -0.5
        return torch.einsum("lbn,lbnd->bnd", logits.softmax(dim=0), stacked)

    def extra_repr(self):
        return f"layers={self.layers}, lora_rank={self.down.out_features}"

    @classmethod
    def check_kwargs(cls, kwargs: dict | None):
        unknown = set(kwargs or {}) - {"lora_rank", "lora_activation"}
        if unknown:
            raise ValueError(f"attn_aggregated_residual_kwargs: unknown {sorted(unknown)}; valid: lora_rank, "
                             f"lora_activation")
