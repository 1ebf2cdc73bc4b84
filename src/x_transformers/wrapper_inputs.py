"""What ``TransformerWrapper`` (wrappers.py) does with its per-call inputs around the stack: the checks
of its extras (prepended embeddings, extra embedding ids, the z-loss), memory tokens interspersed
among the token columns (upstream's ``memory_tokens_interspersed_every``), and per-token inputs cut to
the columns a cache has not seen.

Legend: b batch, n tokens, M memory tokens.
"""

from __future__ import annotations

import torch

from .cache import KVCache, StaticKVCache
from .layers import AttentionLayers, check_mask


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_extra_inputs(net, x, prepend_embeds, prepend_mask, embed_ids, cache, z_loss):
    """TransformerWrapper ``net``'s per-call extras, checked before any work: ``prepend_embeds`` /
    ``prepend_mask`` (with a cache only on the call that fills an empty one: the masked columns stay in it
    as keys nobody attends to), ``embed_ids`` (exactly
    the ``embed_num_tokens`` tables, in range), the attention z-loss (not reversible)."""
    b, emb_dim = x.shape[0], net.emb_dim
    if prepend_embeds is not None:
        if not (isinstance(prepend_embeds, torch.Tensor) and prepend_embeds.is_floating_point()
                and prepend_embeds.ndim == 3 and prepend_embeds.shape[0] == b and prepend_embeds.shape[2] == emb_dim):
            raise ValueError(f"prepend_embeds must be a float tensor (b={b}, P, emb_dim={emb_dim}), got "
                             f"{getattr(prepend_embeds, 'dtype', type(prepend_embeds))} "
                             f"{tuple(getattr(prepend_embeds, 'shape', ()))}")
        fresh = isinstance(cache, (KVCache, StaticKVCache)) and cache.empty
        if cache is not None and not (fresh and net._plain_memory):
            raise ValueError("prepend_embeds with cache=: only the call that fills an empty KVCache / "
                             "StaticKVCache takes them (with their prepend_mask; no interspersed or [CLS]-shared "
                             "memory tokens); later calls give only new tokens")
        check_mask(prepend_mask, b, prepend_embeds.shape[1], name="prepend_mask")
    elif prepend_mask is not None:
        raise ValueError("prepend_mask without prepend_embeds")
    names = set(net.cfg.embed_num_tokens or {})
    given = set(embed_ids or {})
    if names != given:
        raise ValueError(f"embed_ids must give ids for exactly the embed_num_tokens tables {sorted(names)}, "
                         f"got {sorted(given)}")
    for name, ids in (embed_ids or {}).items():
        if not isinstance(ids, torch.Tensor) or ids.shape != x.shape or ids.is_floating_point():
            raise ValueError(f"embed_ids[{name!r}] must be integer ids shaped like x {tuple(x.shape)}")
        if not _is_compiling() and ids.numel() and ((ids < 0) | (ids >= net.cfg.embed_num_tokens[name])).any():
            raise ValueError(f"embed_ids[{name!r}] has ids outside [0, {net.cfg.embed_num_tokens[name]})")
    if z_loss and isinstance(net.attn_layers, AttentionLayers) and net.attn_layers.reversible is not None:
        raise ValueError("return_attn_z_loss with reversible=True: the reversible stack runs its forward "
                         "without gradients, so the loss could not train anything")


def intersperse(h, positions, mask, offset: int, memory, every: int):
    """The memory tokens before every ``every``-th token column (upstream's memory_tokens_interspersed_every):
    h (b, n, dim) of the token columns offset..offset+n-1 -> the stack's input (b, n + M * groups, dim),
    its positions and mask, and the indices of the token rows in it. A token's position moves up by M
    for each memory group up to it; a group sits at the M positions just before its chunk's first token."""
    M = memory.shape[0]  # memory (M, dim): the wrapper's memory tokens
    b, n, _ = h.shape
    cols = offset + torch.arange(n, device=h.device)
    tok_pos = positions + M * (cols // every + 1)  # (b|1, n)
    mem = memory.to(h.dtype)[None].expand(b, -1, -1)
    steps = torch.arange(M, device=h.device) - M
    pieces, pos, keep, real, at = [], [], [], [], 0
    starts = [i for i in range(n) if (offset + i) % every == 0]
    for lo, hi in zip([0] + starts, starts + [n]):
        if hi > lo:  # tokens lo..hi-1
            pieces.append(h[:, lo:hi])
            pos.append(tok_pos[:, lo:hi])
            keep.append(mask[:, lo:hi] if mask is not None else None)
            real.extend(range(at, at + hi - lo))
            at += hi - lo
        if hi < n:  # a memory group before token hi
            pieces.append(mem)
            pos.append(tok_pos[:, hi:hi + 1] + steps)
            keep.append(torch.ones(b, M, dtype=torch.bool, device=h.device) if mask is not None else None)
            at += M
    rows = max(p.shape[0] for p in pos)
    positions = torch.cat([p.expand(rows, -1) for p in pos], dim=1)
    mask = torch.cat(keep, dim=1) if mask is not None else None
    return torch.cat(pieces, dim=1), positions, mask, torch.tensor(real, device=h.device, dtype=torch.long)


def drop_cached(t, offset: int):
    """A per-token input over the whole sequence -> over the new tokens only (columns >= offset):
    the token axis is the last of a 1-D long ``pos``, else the second."""
    if t is None:
        return None
    if isinstance(t, dict):
        return {k: drop_cached(v, offset) for k, v in t.items()}
    return t[offset:] if t.ndim == 1 else t[:, offset:]
