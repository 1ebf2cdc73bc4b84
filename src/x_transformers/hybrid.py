"""What joins the heads' output besides attention itself.

- :class:`HybridBranch` (``attn_hybrid_module``, as Hymba, 2411.13676): a user's sequence module (an
  ``nn.GRU``, a state-space layer) run on the block's input beside attention; its output, as wide as
  the heads' (h * e), and the heads' output are each RMS-normalised per head and averaged, or mixed by
  a learned per-token, per-head gate (``attn_hybrid_learned_mix``). A module that returns
  ``(output, state)`` and takes the state back as its second argument (``nn.GRU``, ``nn.LSTM``)
  decodes with the cache: the state is kept per block. ``attn_hybrid_fold_axial_dim=a`` runs it over
  a strided folds of the sequence (tokens t, t + a, ...) as a rows of a batch; ``attn_hybrid_mask_kwarg``
  names the keyword a bidirectional stack passes the (b, n) token mask to it under.
(Belief attention, ``attn_orthog_projected_values``, is ``Attention._orthogonal``.)

Legend: b batch, h heads, n tokens, e value head dim, a axial folds.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def _first(out):
    """The module's output tensor and its state (None when it returns a tensor alone)."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


class HybridBranch(nn.Module):
    def __init__(self, module: nn.Module, dim: int, heads: int, dim_head: int, norm, *, causal: bool,
                 fold: int | None = None, mask_kwarg: str | None = None, learned_mix: bool = False):
        super().__init__()
        self.module = copy.deepcopy(module)  # one per block, as upstream
        self.heads, self.dim_head, self.causal = heads, dim_head, causal
        self.fold = fold or 1
        self.mask_kwarg = mask_kwarg
        self.out_norm, self.hybrid_norm = norm(heads, dim_head), norm(heads, dim_head)
        self.to_mix = nn.Linear(dim, heads, bias=False) if learned_mix else None
        # a recurrent torch module keeps its state (layers, b, H): batch on dimension 1
        self.state_batch_dim = 1 if isinstance(self.module, nn.RNNBase) else 0
        if isinstance(self.module, nn.RNNBase):
            width = self.module.hidden_size * (2 if self.module.bidirectional else 1)
            if self.module.proj_size:
                width = self.module.proj_size * (2 if self.module.bidirectional else 1)
            if width != heads * dim_head:
                raise ValueError(f"attn_hybrid_module outputs {width} channels; it must match the heads' output, "
                                 f"heads x value head dim = {heads} x {dim_head} = {heads * dim_head}")
            if causal and self.module.bidirectional:
                raise ValueError("attn_hybrid_module is a bidirectional recurrent module, which reads later tokens: "
                                 "a causal stack (Decoder) needs a unidirectional one")
            if not self.module.batch_first:
                raise ValueError("attn_hybrid_module must take (batch, sequence, features) inputs: build it with "
                                 "batch_first=True")

    def _run(self, x, state, kwargs):
        """The module over x (b, n, dim), folded: (b, n, dim) -> (b * a, n / a, dim), token t of fold r at t * a + r."""
        a = self.fold
        if a == 1:
            return self.module(x, *(() if state is None else (state,)), **kwargs)
        b, n, _ = x.shape
        pad = -n % a
        x = F.pad(x, (0, 0, 0, pad))
        x = x.unflatten(1, (-1, a)).transpose(1, 2).flatten(0, 1)  # (b, n/a, a, dim) -> (b a, n/a, dim)
        kwargs = {k: F.pad(v, (0, pad)).unflatten(1, (-1, a)).transpose(1, 2).flatten(0, 1) for k, v in kwargs.items()}
        out, rest = _first(self.module(x, **kwargs))
        out = out.unflatten(0, (b, a)).transpose(1, 2).flatten(1, 2)[:, :n]  # back to (b, n, c)
        return out, rest

    def forward(self, x, attn_out, *, mask=None, cache=None):
        """x (b, n, dim) the block's input; attn_out (b, h, n, e) the heads' output; mask the block's key
        mask (b, 1, 1|n, n) (a bidirectional stack's, without a cache). Returns the mix (b, h, n, e)."""
        if cache is not None and self.fold > 1:
            raise ValueError("attn_hybrid_fold_axial_dim > 1 runs the module over strided folds of the whole "
                             "sequence, which a cache cannot continue token by token; decode without a cache "
                             "(cache_kv=False) or with attn_hybrid_fold_axial_dim=1")
        kwargs = {}
        if not self.causal and self.mask_kwarg is not None and mask is not None:
            n = x.shape[1]  # the tokens kept: a key mask's last n columns, or an (n, n) mask's diagonal
            keep = mask[:, 0, 0, -n:] if mask.shape[-2] == 1 else mask[:, 0].diagonal(dim1=-2, dim2=-1)
            kwargs[self.mask_kwarg] = keep.expand(x.shape[0], n)
        state = cache.get_state("hybrid") if cache is not None else None
        out, new_state = _first(self._run(x, state, kwargs))
        if cache is not None:
            if new_state is None:
                raise ValueError("attn_hybrid_module returned no state to decode with the cache: it must return "
                                 "(output, state) and take the state back as its second argument (as nn.GRU)")
            cache.set_state("hybrid", new_state, self.state_batch_dim)
        b, n = x.shape[:2]
        if out.shape[-1] != self.heads * self.dim_head:
            raise ValueError(f"attn_hybrid_module returned {out.shape[-1]} channels; the heads' output has "
                             f"{self.heads} x {self.dim_head} = {self.heads * self.dim_head}")
        hyb = out.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (b, h, n, e)
        attn_out, hyb = self.out_norm(attn_out), self.hybrid_norm(hyb.to(attn_out.dtype))
        if self.to_mix is None:
            return 0.5 * (attn_out + hyb)
        mix = torch.sigmoid(self.to_mix(x)).transpose(1, 2)[..., None]  # (b, h, n, 1)
        return attn_out.lerp(hyb, mix.to(attn_out.dtype))
