"""``PrefixDecoder``: a decoder whose prefix attends in both directions (a prefix LM).

Legend: b batch, n sequence.
"""

from __future__ import annotations

import torch

from .checks import check_attn_mask
from .layers import AttentionLayers


class PrefixDecoder(AttentionLayers):
    """A decoder whose first ``prefix_attn_len`` positions see each other in both directions
    (a prefix LM, T5 1910.10683 / UniLM 1905.03197); every later position attends causally.

    ``prefix_attn_len`` (int, or (b,) long per row) is a forward keyword, as upstream's; the
    constructor's ``prefix_attn_len`` is the default a wrapper's call uses (a TransformerWrapper
    passes no such keyword). It counts the stack's positions, memory tokens included. None or 0:
    a plain causal decoder. Built as a non-causal stack whose mask adds the causal part, so it has
    no key/value cache (neither has upstream's).
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, *, prefix_attn_len: int | None = None, **kwargs):
        if "causal" in kwargs:
            raise ValueError("a PrefixDecoder sets its own causality (prefix bidirectional, the rest causal); "
                             "drop causal=")
        _check_prefix_len(prefix_attn_len)
        super().__init__(dim, depth, heads, causal=False, **kwargs)
        self.prefix_attn_len = prefix_attn_len

    def prefix_mask(self, b: int, n: int, device, prefix_attn_len=None):
        """(b|1, 1, n, n) bool: key j visible to query i when j <= i or both are in the prefix."""
        length = self.prefix_attn_len if prefix_attn_len is None else prefix_attn_len
        idx = torch.arange(n, device=device)
        allowed = idx[None, :] <= idx[:, None]  # (n, n) causal
        if length is None:
            return allowed[None, None]
        if isinstance(length, torch.Tensor):
            length = length.to(device)[:, None, None, None]  # (b, 1, 1, 1)
        both = (idx[:, None] < length) & (idx[None, :] < length)  # queries and keys in the prefix
        out = allowed | both  # (n, n), or (b, 1, n, n) for per-row lengths
        return out if out.ndim == 4 else out[None, None]

    def forward(self, x, mask=None, context=None, context_mask=None, *, prefix_attn_len=None, attn_mask=None,
                **kwargs):
        """As :meth:`AttentionLayers.forward`; ``prefix_attn_len`` overrides the constructor's."""
        if prefix_attn_len is not None:
            _check_prefix_len(prefix_attn_len, x.shape[0])
        length = self.prefix_attn_len if prefix_attn_len is None else prefix_attn_len
        if length is not None and x.ndim == 3:
            longest = int(length.max()) if isinstance(length, torch.Tensor) else length
            if longest > x.shape[1]:
                raise ValueError(f"prefix_attn_len ({longest}) is longer than the sequence ({x.shape[1]} positions)")
        allowed = self.prefix_mask(x.shape[0], x.shape[1], x.device, prefix_attn_len)
        if attn_mask is not None:
            check_attn_mask(attn_mask, x.shape[0], x.shape[1])
            allowed = allowed & attn_mask
        return super().forward(x, mask, context, context_mask, attn_mask=allowed, **kwargs)


def _check_prefix_len(length, b: int | None = None):
    if length is None:
        return
    if isinstance(length, torch.Tensor):
        if length.dtype.is_floating_point or length.dtype == torch.bool or length.ndim != 1 \
                or (b is not None and length.shape[0] != b) or (length < 0).any():
            raise ValueError(f"prefix_attn_len must be an int >= 0 or a (batch,) integer tensor of lengths >= 0, "
                             f"got {length.dtype} of shape {tuple(length.shape)}")
    elif isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"prefix_attn_len must be an int >= 0 or a (batch,) integer tensor, got {length!r}")
