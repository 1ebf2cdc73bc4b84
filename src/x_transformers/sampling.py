"""Sampling: logit filters as a registry, and one seeded ``sample()``.

A filter maps logits (b, v) to logits of the same shape where dropped tokens are ``-inf``; it
never renormalises (softmax does). Names: ``top_k``, ``top_p`` (nucleus), ``min_p``, ``top_a``; any callable
``fn(logits, **kwargs)`` is accepted too (upstream x-transformers' own filter functions included).
Each filter also takes upstream's keyword names (``frac_num_tokens``, ``thres``, ``min_p``,
``min_p_ratio`` / ``min_p_pow``) and keeps the same set as upstream's on the same logits.
Temperature 0 is greedy decoding.

Legend: b batch (rows), v vocabulary.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Callable

import torch
from torch import Tensor

FILTERS: dict[str, Callable] = {}


def register_filter(name: str):
    def add(fn):
        FILTERS[name] = fn
        return fn

    return add


def _one_of(filter_name: str, ours: str, value, upstream: str, upstream_value, default):
    """A filter keyword given under our name or upstream x-transformers' name, not both."""
    if value is not None and upstream_value is not None:
        raise TypeError(f"{filter_name}: pass {ours}= or {upstream}= (upstream's name for it), not both")
    return default if value is None and upstream_value is None else (value if value is not None else upstream_value)


@register_filter("top_k")
def top_k(logits: Tensor, k: int | None = None, frac: float | None = None, *,
          frac_num_tokens: float | None = None) -> Tensor:
    """Keep the k largest logits (default: ``ceil(frac * vocabulary)``, frac 0.1; ``frac_num_tokens``
    is upstream's name for ``frac``). Fan et al., 1805.04833. Ties at the k-th value are broken by
    index, so exactly min(k, v) tokens survive."""
    v = logits.shape[-1]
    frac = _one_of("top_k", "frac", frac, "frac_num_tokens", frac_num_tokens, 0.1)
    k = math.ceil(frac * v) if k is None else k  # upstream's rounding, so both keep the same set
    if k < 1:
        raise ValueError(f"top_k needs k >= 1, got {k}")
    if k >= v:
        return logits
    values, idx = logits.topk(k, dim=-1)
    # the kept logits written into a row of -inf: three operators (on a GPU, launches) a decode step
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, values)


@register_filter("top_p")
def top_p(logits: Tensor, p: float | None = None, *, thres: float | None = None) -> Tensor:
    """Nucleus sampling (Holtzman et al., 1904.09751): keep the smallest set of most likely tokens
    whose probability mass reaches ``p`` (default 0.9; ``thres`` is upstream's name for it)."""
    p = _one_of("top_p", "p", p, "thres", thres, 0.9)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p needs 0 < p <= 1, got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p  # once p is reached, every further token is dropped
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@register_filter("min_p")
def min_p(logits: Tensor, p: float | None = None, *, min_p: float | None = None) -> Tensor:
    """Min-p sampling (Nguyen et al., 2407.01082): keep tokens whose probability is at least
    ``p`` (default 0.1; ``min_p`` is upstream's name for it) times the most likely token's."""
    p = _one_of("min_p", "p", p, "min_p", min_p, 0.1)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"min_p needs 0 <= p <= 1, got {p}")
    probs = logits.float().softmax(dim=-1)
    limit = p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < limit, float("-inf"))


@register_filter("top_a")
def top_a(logits: Tensor, min_p_pow: float = 2.0, min_p_ratio: float = 0.02) -> Tensor:
    """Top-a sampling (BlinkDL, RWKV; no paper): keep tokens whose probability is at least
    ``min_p_ratio * max_prob ** min_p_pow``, a cut that tightens as the model grows confident.
    Upstream x-transformers' keyword names."""
    if min_p_ratio < 0 or min_p_pow <= 0:
        raise ValueError(f"top_a needs min_p_ratio >= 0 and min_p_pow > 0, got {min_p_ratio}, {min_p_pow}")
    probs = logits.float().softmax(dim=-1)
    limit = probs.amax(dim=-1, keepdim=True) ** min_p_pow * min_p_ratio
    return logits.masked_fill(probs < limit, float("-inf"))


def get_filter(fn: str | Callable | None) -> Callable | None:
    if fn is None or callable(fn):
        return fn
    if fn not in FILTERS:
        close = difflib.get_close_matches(str(fn), FILTERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown logit filter {fn!r}{hint}; valid: {sorted(FILTERS)} or a callable")
    return FILTERS[fn]


def filter_keywords(fn: Callable) -> set[str] | None:
    """The keywords a filter accepts after the logits (read from its signature), or None when it
    takes ``**kwargs`` (anything goes) or has no signature we can read."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]  # the first one is the logits
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_filter_kwargs(fn: str | Callable | None, kwargs: dict | None):
    """Raise TypeError, before any sampling, for a keyword the filter does not take (naming the
    closest one it does take)."""
    kwargs = kwargs or {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"filter_kwargs must be a dict of keywords, got {type(kwargs).__name__}")
    fn = get_filter(fn)
    if fn is None:
        if kwargs:
            raise TypeError(f"filter_kwargs {sorted(kwargs)} were given without a filter_logits_fn; "
                            f"pass one of {sorted(FILTERS)} or drop filter_kwargs")
        return
    accepted = filter_keywords(fn)
    if accepted is None:
        return
    name = getattr(fn, "__name__", repr(fn))
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"filter_kwargs: {name} takes no keyword {key!r}; {hint}valid: {sorted(accepted)}")


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")


def sample(logits: Tensor, *, temperature: float = 1.0, filter_logits_fn=None, filter_kwargs=None,
           generator: torch.Generator | None = None) -> Tensor:
    """Next tokens (b,) from logits (b, v). Temperature 0 is greedy (argmax, no filter needed);
    otherwise the filter is applied to logits / temperature and a token drawn with ``generator``
    (a seeded ``torch.Generator`` makes the draw reproducible)."""
    check_temperature(temperature)
    if temperature == 0:
        return logits.argmax(dim=-1)
    fn = get_filter(filter_logits_fn)
    logits = logits.float() if temperature == 1 else logits.float() / temperature  # (x / 1 is x: no operator)
    if fn is not None:
        logits = fn(logits, **(filter_kwargs or {}))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


__all__ = ["FILTERS", "register_filter", "top_k", "top_p", "min_p", "top_a", "get_filter", "filter_keywords", "check_filter_kwargs",
           "check_temperature", "sample"]
