"""Recurrence: Transformer-XL segment recurrence (Dai et al. 2019, 1901.02860), upstream's
``max_mem_len``; and, at the end, AlphaFold2's recycling of the stack's output (``recycling``).

A long sequence is processed in segments. Each self-attention block keeps the hidden states that
entered it (its *memory*); in the next segment the block's keys and values are made from
``[norm(memory); norm(x)]`` through its own projections, while queries come from the segment
alone. The memories are detached by default, so a segment's loss trains only that segment's
computation (truncated backpropagation through time), yet its tokens attend to the previous ones.

Positions follow upstream: the segment's tokens at 0..n-1, the memory at -m..-1, so relative
schemes (rotary, ALiBi, T5 bias) see the true distances and a causal stack over segments with
unbounded memory computes exactly what it computes over the whole sequence.

Here: checks of the user's ``mems`` / ``mem_masks``, the stack's side (memory columns ahead of the
keys: positions, mask, rotary) and the next memories. ``TransformerWrapper.forward`` takes
``mems=`` / ``mem_masks=`` / ``return_mems=`` / ``detach_mems=``; ``xl_autoregressive_wrapper.py``
trains and generates over segments.

Legend: b batch, n segment tokens, m memory columns, k keys (cached + new), L self-attention blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
from torch import Tensor

from .cache import StaticKVCache


def self_attention_count(layout) -> int:
    return sum(spec.kind == "a" for spec in layout)


def check_mems(mems, mem_masks, *, batch: int, dim: int, count: int):
    """One-line errors for memories of the wrong kind, count, shape or batch."""
    if not isinstance(mems, (list, tuple)) or len(mems) != count:
        raise ValueError(f"mems must be a list of {count} tensors (b, m, dim), one per self-attention block, "
                         f"got {type(mems).__name__} of {len(mems) if isinstance(mems, (list, tuple)) else '?'}")
    m = None
    for i, t in enumerate(mems):
        if not (isinstance(t, Tensor) and t.is_floating_point() and t.ndim == 3 and t.shape[0] == batch
                and t.shape[2] == dim):
            raise ValueError(f"mems[{i}] must be a float tensor (b={batch}, m, dim={dim}), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if m is not None and t.shape[1] != m:
            raise ValueError(f"mems must all hold the same number of columns: mems[0] has {m}, mems[{i}] {t.shape[1]}")
        m = t.shape[1]
    if mem_masks is None:
        return
    if not isinstance(mem_masks, (list, tuple)) or len(mem_masks) != count:
        raise ValueError(f"mem_masks must be a list of {count} bool masks (b, m), one per memory")
    for i, t in enumerate(mem_masks):
        if t is not None and not (isinstance(t, Tensor) and t.dtype == torch.bool and t.shape == (batch, m)):
            raise ValueError(f"mem_masks[{i}] must be a bool tensor ({batch}, {m}) (True = keep) or None, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def shift_down(items, shift: int):
    """Upstream's ``shift_mem_down``: block i reads the memory of block i + shift (wrapping round),
    a higher layer's states feeding a lower one in the next segment. Python slicing: a shift of
    the block count or more changes nothing, as upstream."""
    if not shift or items is None:
        return items
    items = list(items)
    return items[shift:] + items[:shift]


def with_memory(stack, ctx, mems, mem_masks, b: int):
    """``ctx`` (built over the segment's keys) with the memory columns ahead of its keys: their
    positions (-m..-1), the score modification over all keys, rotary angles of the memory, and per
    block of the layout (memory, its self-attention mask (b, 1, 1, m + k) or None). ``mem_masks``:
    one (b, m) mask or None per self-attention block, or None."""
    m = mems[0].shape[1]
    device = mems[0].device
    mem_pos = torch.arange(-m, 0, device=device)[None]
    keys = ctx.key_positions.shape[-1]
    key_positions = torch.cat((mem_pos.expand(ctx.key_positions.shape[0], -1), ctx.key_positions), dim=-1)

    def block_mask(mem_mask):
        if ctx.self_mask is None and mem_mask is None:
            return None
        seq = ctx.self_mask if ctx.self_mask is not None else torch.ones(b, 1, 1, keys, dtype=torch.bool, device=device)
        front = mem_mask if mem_mask is not None else torch.ones(b, m, dtype=torch.bool, device=device)
        return torch.cat((front[:, None, None, :], seq), dim=-1)

    masks = list(mem_masks) if mem_masks is not None else [None] * len(mems)
    pairs = iter([(mem, block_mask(mask)) for mem, mask in zip(mems, masks)])
    slots = tuple(next(pairs) if spec.kind == "a" else None for spec in stack.layout)
    return replace(ctx, key_positions=key_positions, score_mod=stack.score_mod(ctx.positions, key_positions),
                   mem_rotary=stack.rotary(mem_pos) if stack.rotary is not None else None, mems=slots)


def next_memories(mems, hiddens, max_mem_len: int, detach: bool):
    """Each block's memory for the next segment: its memory then this segment's inputs to it,
    the last ``max_mem_len`` columns (none for 0, as upstream), detached unless asked not to."""
    new = [torch.cat((m, h), dim=-2) for m, h in zip(mems, hiddens)] if mems is not None else list(hiddens)
    new = [t[:, t.shape[1] - min(max_mem_len, t.shape[1]):] for t in new]
    return [t.detach() for t in new] if detach else new


def wrapper_inputs(wrapper, mems, mem_masks, return_mems: bool, cache) -> dict | None:
    """What ``TransformerWrapper.forward`` hands its stack for ``mems=`` / ``return_mems=True``:
    the memories after ``shift_mem_down`` (None when they hold no columns), their masks, and the
    list that collects this segment's hidden states; None when neither is asked for."""
    if mems is None and not return_mems:
        if mem_masks is not None:
            raise ValueError("mem_masks without mems")
        return None
    cfg = wrapper.cfg
    why = ("num_memory_tokens" if wrapper.num_memory_tokens else "a FunnelEncoder"
           if not hasattr(wrapper.attn_layers, "layout") else None)
    if why is not None:
        raise ValueError(f"Transformer-XL memories (mems / return_mems) are not supported with {why}")
    if isinstance(cache, StaticKVCache):
        raise ValueError("Transformer-XL memories with a StaticKVCache are not supported; decode with a KVCache")
    if mems is not None and any(isinstance(t, Tensor) and t.ndim == 3 and t.shape[1] for t in mems) \
            and not cfg.max_mem_len:
        raise ValueError("mems= with columns on a TransformerWrapper built with max_mem_len=0 (it keeps no memory); "
                         "build it with max_mem_len > 0")
    mems, mem_masks = shift_down(mems, cfg.shift_mem_down), shift_down(mem_masks, cfg.shift_mem_down)
    empty = mems is not None and len(mems) and all(isinstance(t, Tensor) and t.ndim == 3 and not t.shape[1]
                                                   for t in mems)
    return dict(given=mems, mems=None if empty else mems, mem_masks=None if empty else mem_masks, hiddens=[])


def recycle_steps(wrapper, steps, cache) -> int:
    """How many times a ``recycling`` wrapper runs its stack this forward: ``steps`` if given, else
    in training a draw from 1..train_max_recycle_steps (upstream), else an error (eval needs it)."""
    if wrapper.recycled_proj is None:
        raise ValueError("recycle_steps= needs a wrapper built with recycling=True")
    if cache is not None:
        raise ValueError("recycling reruns the whole stack on its own output, which a key/value cache cannot "
                         "hold; decode without a cache (cache_kv=False)")
    if steps is None:
        if not wrapper.training:
            raise ValueError("recycling: pass recycle_steps= to forward in eval mode (training draws it)")
        return int(torch.randint(wrapper.cfg.train_max_recycle_steps, ()).item()) + 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"recycle_steps must be an integer >= 1, got {steps!r}")
    return steps


def recycle(stack, x, proj, steps: int):
    """AlphaFold2's recycling (2107.03850, supplement 1.10), upstream's ``recycling``: out_0 =
    stack(x), out_i = stack(x + proj(out_{i-1}.detach())); every step but the last runs without
    gradients. ``stack``: input (b, n, dim) -> (output, attention maps or None)."""
    out = None
    for i in range(steps):
        with torch.no_grad() if i < steps - 1 else contextlib.nullcontext():
            out = stack(x if out is None else x + proj(out[0].detach()))
    return out
