"""Upstream x-transformers' per-call inputs of a layer stack, on top of ``AttentionLayers.forward``.

- ``pos``: custom positions of the new tokens, (n,) or (b|1, n) integers, for every position
  scheme of the stack (rotary, PoPE, ALiBi, T5, dynamic bias, TUPE); with a cache they may cover
  the cached tokens too (upstream's convention), of which the last n are taken. (b, h, n): one
  position sequence per head, ALiBi only (as upstream's ``forward_custom_pos``).
- ``context_pos`` (m_ctx,) or (b|1, m_ctx): the context's positions; cross-attention then rotates
  its queries at the tokens' positions and its keys at these (rotary stacks only).
- ``return_hiddens=True``: upstream's ``(x, intermediates)``, an
  :class:`~x_transformers.cache.Intermediates` holding the key/value cache of a causal stack
  (passed back as ``cache=`` it decodes on: the last ``cache_age`` columns of x are the new
  tokens, as upstream), ``hiddens`` (each self-attention block's input), ``layer_hiddens`` (each
  block's input, then the output) and ``last_hidden``.

Legend: b batch, n new tokens, m keys, h heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import replace

from .cache import Intermediates, KVCache


# upstream's per-call stack inputs that TransformerWrapper.forward hands to its stack as they are
STACK_CALL_KEYS = ("context_pos", "repeat_blocks", "self_attn_additional_kv", "additional_kv_mask",
                   "detach_additional_kv", "cross_attn_kv_residuals")


def _integer(t, name: str):
    if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an integer tensor of positions, got {got}")


def custom_positions(stack, pos, b: int, n: int, cached: bool):
    """``pos`` -> (positions (b|1, n) long or None, per-head positions (b|1, h, n) long or None)."""
    _integer(pos, "pos")
    if pos.ndim == 3:
        why = _per_head_refusal(stack, cached)
        if why is not None:
            raise ValueError(f"pos of shape (b, heads, n) gives each head its own positions, which only ALiBi "
                             f"reads (upstream's rule); {why}")
        heads = stack.rel_pos.alibi_heads
        if pos.shape[0] not in (1, b) or pos.shape[1] not in (heads, stack.rel_pos.heads) or pos.shape[2] != n:
            raise ValueError(f"per-head pos must have shape ({b} or 1, {heads}, {n}) (one row per ALiBi head); "
                             f"got {tuple(pos.shape)}")
        return None, pos.long()
    pos = pos[None] if pos.ndim == 1 else pos
    if pos.ndim != 2 or pos.shape[0] not in (1, b) or pos.shape[1] < n or (pos.shape[1] > n and not cached):
        raise ValueError(f"pos must have shape ({n},) or ({b} or 1, {n}) (with a cache it may also cover the cached "
                         f"tokens: its last {n} columns are taken); got {tuple(pos.shape)}")
    return pos[:, -n:].long(), None


def _per_head_refusal(stack, cached: bool) -> str | None:
    from .positional import AlibiPositionalBias
    if not isinstance(stack.rel_pos, AlibiPositionalBias):
        return "this stack has no alibi_pos_bias"
    if stack.rotary is not None or stack.polar is not None or stack.tupe is not None:
        return "this stack also has rotary / polar / TUPE positions, which take one sequence"
    if cached:
        return "not with a cache (the cache keeps one position per key)"
    return None


def context_rotary(stack, context_pos, context):
    """The cross-attention keys' rotary angles at ``context_pos`` (b|1, m_ctx)."""
    if stack.rotary is None:
        raise ValueError("context_pos rotates cross-attention keys and queries, which needs rotary_pos_emb=True "
                         "(upstream ignores it without rotary)")
    if not stack.needs_context or context is None:
        raise ValueError("context_pos was given but this stack has no cross-attention context")
    _integer(context_pos, "context_pos")
    cp = context_pos[None] if context_pos.ndim == 1 else context_pos
    if cp.ndim != 2 or cp.shape[0] not in (1, context.shape[0]) or cp.shape[1] != context.shape[1]:
        raise ValueError(f"context_pos must have shape ({context.shape[1]},) or (b|1, {context.shape[1]}); "
                         f"got {tuple(context_pos.shape)}")
    return stack.rotary(cp.long())


def can_cache(stack) -> bool:
    """Whether ``return_hiddens`` fills a key/value cache for this stack (a causal one that can decode)."""
    return (stack.causal and stack.reversible is None and not stack.cfg.mv_split_residual
            and not stack.cfg.shift_tokens and not stack.attn_cfg.selective)


def forward_with_hiddens(stack, x, mask, context, context_mask, *, cache, cache_age: int, kwargs: dict):
    """``stack.forward(..., return_hiddens=True)`` (and ``cache=`` an Intermediates): upstream's call,
    functional (the Intermediates given is not extended; the returned one holds the new cache)."""
    offset = 0
    if isinstance(cache, Intermediates):
        if cache.cache is None:
            raise ValueError("cache=: this Intermediates holds no key/value cache (it came from a stack that cannot "
                             "decode incrementally: a bidirectional one)")
        if isinstance(cache_age, bool) or not isinstance(cache_age, int) or not 0 < cache_age <= x.shape[1]:
            raise ValueError(f"cache_age must be an int in 1..{x.shape[1]} (how many of x's last columns are new), "
                             f"got {cache_age!r}")
        offset, kv = cache.cache_length, cache.cache.copy()
        x = x[:, -cache_age:]  # upstream: the stack's new tokens are x's last cache_age columns
        if mask is not None and mask.shape[-1] != x.shape[1]:
            mask = mask[:, -cache_age:]
    elif cache is None:
        kv = KVCache() if can_cache(stack) and kwargs.get("repeat_blocks") is None else None
    else:
        raise ValueError("return_hiddens=True takes cache= as an Intermediates (what it returned); "
                         "a KVCache is extended in place without it")
    layer_hiddens, block_hiddens = [], []
    out = stack.forward(x, mask, context, context_mask, cache=kv, layer_hiddens=layer_hiddens,
                        block_hiddens=block_hiddens, **kwargs)
    x_out, attns = out if isinstance(out, tuple) else (out, None)
    inter = Intermediates(cache=kv, cache_length=offset + x.shape[1], last_hidden=x_out, attn_maps=attns)
    if stack.reversible is None:  # (the reversible coupling runs branches, not blocks: no per-block inputs)
        inter.hiddens = [h for h, spec in zip(layer_hiddens, stack.layout) if spec.kind == "a"]
        inter.layer_hiddens = layer_hiddens + [x_out]
    else:
        inter.hiddens = inter.layer_hiddens = None
    inter.block_hiddens = block_hiddens or None  # each block's output, the last the final one (block_inputs.py)
    return x_out, inter


def repeat_order(stack, repeat_blocks, per_block: bool = False) -> tuple[int, ...]:
    """Upstream's ``repeat_blocks`` ((start, end), times) or a tuple of them, over units of the default
    layout (``a f``, ``a c f``, ...; an int start is a one-unit range) -> the blocks' run order: each
    named range of units runs ``times`` times in place, the others once. ``per_block``: the call
    carries state kept per block of the layout (a cache, XL memories, ff_deep_embed): refused."""
    from .layout import unit_length
    cfg = stack.cfg
    why = ("a cache, Transformer-XL memories or ff_deep_embed (kept per block of the layout)" if per_block else"custom_layers / sandwich_coef / par_ratio / top_attn_to_ff (not a repeated unit)"
           if unit_length(cfg) == 1 and (cfg.custom_layers is not None or cfg.sandwich_coef is not None
                                         or cfg.par_ratio is not None or cfg.top_attn_to_ff) else
           "layers_execute_order" if cfg.layers_execute_order is not None else
           "weight_tie_layers" if cfg.weight_tie_layers else "reversible=True" if stack.reversible is not None
           else "unet_skips" if stack.unet is not None else
           "integrate_layers / attn_aggregated_residuals" if cfg.integrate_layers or cfg.attn_aggregated_residuals
           else None)
    if why is not None:
        raise ValueError(f"repeat_blocks reruns units of the default layout in place; not with {why}")
    unit = unit_length(cfg)
    units = len(stack.layout) // unit
    spec = (repeat_blocks,) if (isinstance(repeat_blocks, tuple) and len(repeat_blocks) == 2
                                and isinstance(repeat_blocks[1], int) and not isinstance(repeat_blocks[1], bool)) \
        else repeat_blocks
    ranges = {}
    try:
        for span, times in spec:
            start, end = (span, span) if isinstance(span, int) else span
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, times))
            if not ok or not 0 <= start <= end < units or times < 1 or start in ranges:
                raise ValueError
            ranges[start] = (end, times)
    except (TypeError, ValueError):
        raise ValueError(f"repeat_blocks must be ((start, end), times) or a tuple of them, 0 <= start <= end < {units} "
                         f"units, times >= 1, ranges apart; got {repeat_blocks!r}") from None
    order, u = [], 0
    while u < units:
        end, times = ranges.get(u, (u, 1))
        if any(s in ranges for s in range(u + 1, end + 1)):
            raise ValueError(f"repeat_blocks: ranges overlap in {repeat_blocks!r}")
        order += list(range(u, end + 1)) * times
        u = end + 1
    return tuple(i for k in order for i in range(k * unit, (k + 1) * unit))


def causal_override(stack, causal, *, cache, xl: bool):
    """Upstream's ``causal=`` at forward: self-attention runs causally or not for this call (returned; None
    when it is the stack's own). Refused where causality is built into more than the attention mask, and
    with a cache on a call run bidirectionally."""
    if causal is None or causal is stack.causal:
        return None
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    cfg, attn = stack.cfg, stack.attn_cfg
    why = ("a cache (a bidirectional call's outputs change as tokens arrive)" if cache is not None and not causal else
           "Transformer-XL memories" if xl else
           "rotary_xpos (causal only)" if cfg.rotary_xpos else "shift_tokens (its shift range follows causality)"
           if cfg.shift_tokens else "mv_split_residual (prefix means in a causal stack)" if cfg.mv_split_residual
           else "rel_pos_bias (its buckets follow causality)" if cfg.rel_pos_bias else
           "attn_selective (a causal idea)" if attn.selective else
           "a PrefixDecoder (its mask sets causality)" if type(stack).__name__ == "PrefixDecoder" else None)
    if why is not None:
        raise ValueError(f"causal={causal} at forward overrides the stack's causality ({stack.causal}); not with {why}")
    return causal


def additional_kv(stack, kvs, mask, detach: bool, b: int):
    """Upstream's ``self_attn_additional_kv``: key/value pairs ((b, g', m, d), (b, g', m, e)) prepended to
    self-attention's own, one per self-attention block counted from the top (the last ones get them, as
    upstream's default routing), or an :class:`Intermediates` whose cache holds another model's; with
    ``additional_kv_mask`` (b, m) over them. -> per block of the layout: (k, v, mask) or None."""
    if isinstance(kvs, Intermediates):
        if kvs.cache is None:
            raise ValueError("self_attn_additional_kv: this Intermediates holds no key/value cache")
        layers = kvs.cache.layers
        kvs = [(layers[i].k, layers[i].v) for i in sorted(layers) if not layers[i].cross]
    if not isinstance(kvs, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in kvs):
        raise ValueError("self_attn_additional_kv must be a list of (keys, values) pairs or an Intermediates")
    attn = [i for i, s in enumerate(stack.layout) if s.kind == "a"]
    if len(kvs) > len(attn):
        kvs = kvs[-len(attn):]  # as upstream: the top ones
    d, e = stack.attn_cfg.dim_head, stack.attn_cfg.v_dim_head
    for k, v in kvs:
        if k.ndim != 4 or v.ndim != 4 or k.shape[0] != b or k.shape[:3] != v.shape[:3] or k.shape[-1] != d \
                or v.shape[-1] != e or stack.cfg.heads % k.shape[1]:
            raise ValueError(f"self_attn_additional_kv: keys (b={b}, heads dividing {stack.cfg.heads}, m, {d}) and values "
                             f"(b, heads, m, {e}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if mask is not None:
        m = kvs[-1][0].shape[-2] if kvs else 0
        if mask.dtype != torch.bool or mask.shape != (b, m):
            raise ValueError(f"additional_kv_mask must be a bool tensor ({b}, {m}), got {mask.dtype} {tuple(mask.shape)}")
    out = [None] * len(stack.layout)
    for i, (k, v) in zip(attn[len(attn) - len(kvs):], kvs):
        out[i] = (k.detach(), v.detach(), mask) if detach else (k, v, mask)
    return tuple(out)


def cross_contexts(stack, residuals, context):
    """Upstream's ``cross_attn_kv_residuals``: (c, b, m, dim_context) (or (b, m, dim_context), for the
    first) added to the context that the j-th cross-attention block reads keys and values from."""
    if context is None or not isinstance(residuals, Tensor):
        raise ValueError("cross_attn_kv_residuals needs cross-attention (a context) and a tensor")
    residuals = residuals[None] if residuals.ndim == 3 else residuals
    cross = [i for i, s in enumerate(stack.layout) if s.kind == "c"]
    if residuals.ndim != 4 or residuals.shape[1:] != context.shape or residuals.shape[0] > len(cross):
        raise ValueError(f"cross_attn_kv_residuals must be (layers <= {len(cross)}, {', '.join(map(str, context.shape))}) "
                         f"or the context's shape, got {tuple(residuals.shape)}")
    out = [None] * len(stack.layout)
    for i, r in zip(cross, residuals):
        out[i] = context + r
    return tuple(out)


def call_context(stack, ctx, b: int, *, causal, head_pos, context_pos, layer_hiddens, additional, cross_residuals,
                 block_io=None):
    """``ctx`` with this call's upstream inputs (each None when not given)."""
    kvs, kv_mask, detach = additional
    if stack.reversible is not None and (kvs is not None or cross_residuals is not None):
        raise ValueError("self_attn_additional_kv / cross_attn_kv_residuals: not with reversible=True (its recomputing "
                         "backward takes only the context's own tensors as inputs)")
    if kvs is None and (kv_mask is not None or detach):
        raise ValueError("additional_kv_mask / detach_additional_kv configure self_attn_additional_kv, not given")
    new = dict(causal=causal, layer_hiddens=layer_hiddens, block_io=block_io,
               score_mod=stack.rel_pos.score_mod(head_pos, head_pos) if head_pos is not None else None,
               context_rotary=context_rotary(stack, context_pos, ctx.context) if context_pos is not None else None,
               extra_kv=additional_kv(stack, kvs, kv_mask, detach, b) if kvs is not None else None,
               contexts=cross_contexts(stack, cross_residuals, ctx.context) if cross_residuals is not None else None)
    return replace(ctx, **{k: v for k, v in new.items() if v is not None})
