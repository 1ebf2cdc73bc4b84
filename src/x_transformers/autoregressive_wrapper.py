"""Upstream's module path ``x_transformers.autoregressive_wrapper``, over ours.

``AutoregressiveWrapper`` is ours (:mod:`x_transformers.autoregressive`). The logit filters are
those of :mod:`x_transformers.sampling` under upstream's parameter names and order
(``top_k(logits, frac_num_tokens, k)``, ``top_p(logits, thres)``, ``min_p(logits, min_p)``), so
code written against upstream passes them by name or position unchanged. One difference:
upstream's ``top_k`` keeps ``ceil(frac * vocab)`` tokens, ours ``max(1, int(frac * vocab))``.
"""

from __future__ import annotations

from torch import Tensor

from . import sampling
from .autoregressive import AutoregressiveWrapper

__all__ = ["AutoregressiveWrapper", "top_k", "top_p", "min_p"]


def top_k(logits: Tensor, frac_num_tokens: float = 0.1, k: int | None = None) -> Tensor:
    """Keep the k largest logits (default ``frac_num_tokens`` of the vocabulary): sampling.top_k."""
    return sampling.top_k(logits, k=k, frac=frac_num_tokens)


def top_p(logits: Tensor, thres: float = 0.9) -> Tensor:
    """Nucleus filter keeping probability mass ``thres``: sampling.top_p."""
    return sampling.top_p(logits, p=thres)


def min_p(logits: Tensor, min_p: float = 0.1) -> Tensor:  # noqa: A002 - upstream's parameter name
    """Keep tokens at least ``min_p`` times as likely as the most likely one: sampling.min_p."""
    return sampling.min_p(logits, p=min_p)
