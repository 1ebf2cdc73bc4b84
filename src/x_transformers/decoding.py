"""What ``generate`` decodes with, apart from the wrapper: the validated :class:`GenerationConfig`,
ragged prompts left-padded (:func:`left_pad`), :func:`prefill` (the prompt once, filling the
cache), :func:`decode_step` (one token per row: the function to compile; with a
:class:`~x_transformers.cache.StaticKVCache` its shapes never change) and each model's compiled
copy of it (:func:`compiled_decoder`), with a one-line reason where it does not compile.

Legend: b batch, n prompt length, v vocabulary.
"""

from __future__ import annotations

import logging
import math
import traceback
import types
import warnings
import weakref
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Callable, Mapping

import torch
from torch import Tensor

from .cache import StaticKVCache
from .checks import check_not_empty
from .sampling import check_filter_kwargs, check_temperature, get_filter

log = logging.getLogger(__name__)


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """What :meth:`AutoregressiveWrapper.generate` was asked for (its keywords), validated once,
    before any work, and passed by name to the decoding helpers. ``num_tokens`` is the model's
    vocabulary (``eos_token`` must lie in it); ``static_cache=None`` resolves to ``bool(compile)``."""

    seq_len: int
    num_tokens: int
    temperature: float = 1.0
    filter_logits_fn: str | Callable | None = None
    filter_kwargs: Mapping = field(default_factory=dict)
    eos_token: int | None = None
    cache_kv: bool = True
    static_cache: bool | None = None
    compile: bool | str | dict = False
    beams: int | None = None
    length_penalty: float = 1.0
    return_scores: bool = False
    generator: torch.Generator | None = None
    restrict_to_max_seq_len: bool = False
    stochastic: bool = False

    def __post_init__(self):
        _positive_int("seq_len", self.seq_len)
        _positive_int("beams", self.beams, allow_none=True)
        check_temperature(self.temperature)
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) \
                or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number (1.0 is the mean log-probability), "
                             f"got {self.length_penalty!r}")
        if self.eos_token is not None and (isinstance(self.eos_token, bool) or not isinstance(self.eos_token, int)
                                           or not 0 <= self.eos_token < self.num_tokens):
            raise ValueError(f"eos_token must be a token id in [0, {self.num_tokens}) (num_tokens={self.num_tokens}), "
                             f"got {self.eos_token!r}")
        get_filter(self.filter_logits_fn)  # an unknown name lists the valid ones
        check_filter_kwargs(self.filter_logits_fn, self.filter_kwargs)
        object.__setattr__(self, "filter_kwargs", MappingProxyType(dict(self.filter_kwargs or {})))
        if not isinstance(self.compile, (bool, str, dict)):
            raise TypeError(f"compile must be a bool, a torch.compile mode name or a dict of torch.compile "
                            f"keywords, got {type(self.compile).__name__}")
        if self.static_cache is None:
            object.__setattr__(self, "static_cache", bool(self.compile))
        elif self.compile and not self.static_cache:
            raise ValueError("compile=True needs static_cache=True: the dynamic cache changes shape every step")
        if not self.cache_kv and (self.static_cache or self.compile):
            raise ValueError("static_cache / compile need cache_kv=True")


def left_pad(prompts, pad_value: int = 0) -> tuple[Tensor, Tensor | None]:
    """A (b, n) tensor, or a list of 1-D tensors of different lengths -> tokens (b, n) and the
    keep-mask (b, n) (None when no row is padded). Padding goes on the left so every row's next
    token is in the last column."""
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise ValueError(f"prompts must be a (batch, seq) tensor, got shape {tuple(prompts.shape)}")
        check_not_empty(prompts, "prompts")
        return prompts, None
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.ndim != 1 or p.numel() == 0:
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D token tensor, got "
                             f"{tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}; drop it or give it a token")
    n = max(p.numel() for p in prompts)
    tokens = torch.full((len(prompts), n), pad_value, dtype=prompts[0].dtype, device=prompts[0].device)
    mask = torch.zeros(len(prompts), n, dtype=torch.bool, device=prompts[0].device)
    for i, p in enumerate(prompts):
        tokens[i, n - p.numel():] = p
        mask[i, n - p.numel():] = True
    return tokens, None if bool(mask.all()) else mask


def conditioned(condition) -> dict:
    """The keyword a net gets for a stack's adaptive norms (none when there is no condition)."""
    return {} if condition is None else {"condition": condition}


def prefill(net, tokens: Tensor, mask: Tensor | None, cache, context=None, context_mask=None, condition=None,
            prepend_embeds: Tensor | None = None, prepend_mask: Tensor | None = None) -> Tensor:
    """Run the prompt (b, n) through ``net``, filling ``cache``; logits (b, v) of the last column.
    ``prepend_embeds`` (b, P, emb_dim) are read ahead of the prompt and stay in the cache; ``prepend_mask``
    (b, P) marks the kept ones (the others stay in the cache as keys no later column attends to)."""
    ahead = {} if prepend_embeds is None else {"prepend_embeds": prepend_embeds}
    if prepend_mask is not None:
        ahead["prepend_mask"] = prepend_mask
    return net(tokens, mask, cache=cache, context=context, context_mask=context_mask, **conditioned(condition),
               **ahead)[:, -1]


def decode_step(net, token: Tensor, cache, context=None, context_mask=None, condition=None) -> Tensor:
    """One new token per row (b, 1) -> logits (b, v). Compile this one (static cache)."""
    return net(token, cache=cache, context=context, context_mask=context_mask, **conditioned(condition))[:, -1]


# Each model's compiled decode steps: net -> {torch.compile options: the compiled step, or the
# one-line reason it did not compile}. Weak keys: a dropped model takes its compiled steps along.
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# What a failed compile raises (tracing, the backend's compiler, the recompile limit); any other
# error comes from the model itself and is not hidden.
# (FailOnRecompileLimitHit is not a TorchDynamoException; older torch names it otherwise or lacks it)
_RECOMPILE_LIMIT = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", torch._dynamo.exc.TorchDynamoException)
_COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, _RECOMPILE_LIMIT)


def compiled_decoder(net, options: dict):
    """A decode step for ``net`` compiled with torch.compile ``options``; where compiling fails,
    it warns in one line (:func:`compile_failure`) and runs the uncompiled :func:`decode_step`.

    Each model compiles its own copy of decode_step: dynamo keeps compiled graphs, their guards
    and the recompile count on a function's code object, so through the one shared decode_step
    every model's graphs would pile into one list (after 8 a hard error under fullgraph=True).
    ``dynamic=False``: a static cache has fixed shapes, so each (batch, max_len) gets a graph of
    its own with every size a Python int. With automatic dynamic shapes, sizes that changed between
    earlier calls, another model's included (dynamo keeps that record per source location), became
    symbolic, and shape-derived decisions (grouped-query attention) became SymBools that kernels refuse.
    """
    steps = _COMPILED_STEPS.setdefault(net, {})
    key = repr(sorted(options.items()))
    if isinstance(steps.get(key), str):  # it did not compile before: say so again, do not try again
        warnings.warn(steps[key])
        return decode_step
    if key not in steps:
        own = types.FunctionType(decode_step.__code__.replace(), decode_step.__globals__, decode_step.__name__)
        steps[key] = torch.compile(own, **(dict(fullgraph=True, dynamic=False) | options))  # options may override
    compiled = steps[key]

    def step(net, token, cache, context=None, context_mask=None, condition=None):
        nonlocal compiled
        args = (net, token, cache, context, context_mask, condition)
        try:
            if compiled is not decode_step and isinstance(cache, StaticKVCache):
                return cache.count_compiled(token.shape[1], lambda: compiled(*args))  # the graph cannot count
            return compiled(*args)
        except _COMPILE_ERRORS as e:
            # Raised while compiling, before the graph ran: the cache is as it was. Not tried again
            # for this model, except at the recompile limit (the graphs compiled so far still serve).
            reason = compile_failure(net, e)
            warnings.warn(reason)
            log.debug("the decode step's compile error, in full", exc_info=e)
            if type(e) is not _RECOMPILE_LIMIT:
                steps[key] = reason
            compiled = decode_step
            return decode_step(*args)

    return step


def _static_len(n: int) -> int:
    """Compiled, each cache length is a graph of its own: round it up to a power of two so that
    prompts of many lengths share a few graphs (unfilled slots are masked out)."""
    return 1 << (n - 1).bit_length()


def _model_keywords(net) -> str:
    """The layer stack's non-default keywords (what sets the model's features apart)."""
    layers = net.attn_layers
    parts = [f"num_memory_tokens={net.num_memory_tokens}"] if net.num_memory_tokens else []
    for cfg, prefix in ((layers.cfg, ""), (layers.attn_cfg, "attn_"), (layers.ff_cfg, "ff_")):
        for f in fields(cfg):
            value = getattr(cfg, f.name)
            if f.default is not MISSING and value != f.default and f.name != "causal":
                parts.append(f"{prefix}{f.name}={value!r}")
    return ", ".join(parts) or "the plain model"


def _failed_at(error) -> str:
    """The innermost frame of this package in the code being compiled, as "file.py:line in fn"."""
    frames = getattr(error, "real_stack", None) or traceback.extract_tb(error.__traceback__)
    skip = ("autoregressive.py", "decoding.py")  # the loop and decode_step itself: not where it failed
    ours = [f for f in frames if "x_transformers" in f.filename and not f.filename.endswith(skip)]
    if not ours:
        return "torch.compile"
    return f"{ours[-1].filename.rsplit('/', 1)[-1]}:{ours[-1].lineno} in {ours[-1].name}"


def compile_failure(net, error) -> str:
    """One line: which model did not compile, where, and why."""
    if type(error) is _RECOMPILE_LIMIT:
        why = (f"torch._dynamo.config.recompile_limit ({torch._dynamo.config.recompile_limit}) reached: "
               f"a graph per batch size and cache length was compiled already")
    else:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        why = f"{_failed_at(error)}: {type(error).__name__}: {first}"
    return (f"generate(compile=True): the decode step of this model ({_model_keywords(net)}) does not compile "
            f"[{why}]; decoding with the static cache uncompiled")
