"""Per-call transforms of the residual stream entering a block, and each block's output stream.

Upstream x-transformers' ``transform_block_inputs`` (the Full-bandwidth Transformer feeds a deep
block's latent back into a shallow one through it, ``full_bandwidth.py``): a dict
``{depth: fn(stream) -> stream}`` or one callable ``fn(depth, stream) -> stream``. ``depth`` counts
blocks from 1 as upstream does: a block is one repeated unit of the default layout (``a f``,
``a c f``, macaron's ``f a f``), a single layer on layouts that are no repeated unit (custom_layers,
sandwich_coef, par_ratio, top_attn_to_ff). Depth d's transform is applied to the stream entering
block d, in the order the blocks run; on a ``TransformerWrapper`` depth 1 is applied to the token
embeddings before positions are added (upstream's place), the others inside the stack.

``block_hiddens`` (upstream's ``LayerIntermediates`` field): each block's output stream, the last
being the stack's final output (after its final norm); every column the stack sees (memory
tokens, [CLS], prepended embeddings included); under hyper-connections the streams' sum. A
wrapper's intermediates also get upstream's ``hiddens`` (each self-attention block's input) and
``layer_hiddens`` (each block's input, then the final output) from the same call (:func:`record`).

Refused, at call time before any work, where a transform has no single stream to act on:
``reversible=True`` (two coupled streams), hyper-connections (several streams), ``repeat_blocks``
(a rerun unit has no single depth), and on the wrapper a ``FunnelEncoder`` (blocks change length),
``looped`` and ``recycling`` (the stack runs several times).

Legend: b batch, n columns, d dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

ARG = "transform_block_inputs"
STACK_KEYS = (ARG, "block_hiddens", "layer_hiddens")  # what a wrapper's call hands its stack (wrapper_split)


@dataclass(frozen=True)
class BlockIO:
    """What the block runner reads: ``starts`` {layout index of a block's first layer: fn}, ``ends``
    (layout indices closing a block) and ``hiddens`` (the list receiving each block's output, or None)."""

    starts: dict
    ends: frozenset
    hiddens: list | None = None


def block_count(stack) -> int:
    from .layout import unit_length
    return max(len(stack.layout) // unit_length(stack.cfg), 1)


def resolve(transforms, count: int) -> dict[int, Callable]:
    """``transform_block_inputs`` -> {depth (1..count): fn(stream) -> stream}; one line naming it otherwise."""
    if callable(transforms) and not isinstance(transforms, dict):
        return {d: (lambda x, d=d: transforms(d, x)) for d in range(1, count + 1)}
    if not isinstance(transforms, dict):
        raise ValueError(f"{ARG} must be a dict {{depth: fn(stream) -> stream}} or a callable fn(depth, stream), "
                         f"got {type(transforms).__name__}")
    for depth, fn in transforms.items():
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= count:
            raise ValueError(f"{ARG}: depths count blocks from 1 to {count} in this stack, got {depth!r}")
        if not callable(fn):
            raise ValueError(f"{ARG}[{depth}] must be a callable fn(stream) -> stream, got {type(fn).__name__}")
    return dict(transforms)


def checked(fn: Callable, depth: int) -> Callable:
    """fn, its output checked to keep the stream's shape and dtype (one line naming the depth)."""
    def run(x: Tensor) -> Tensor:
        out = fn(x)
        if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
            got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{ARG}[{depth}] must return the stream's shape and dtype {x.dtype} {tuple(x.shape)}, "
                             f"got {got}")
        return out
    return run


def stack_refusal(stack, repeat_blocks) -> str | None:
    if stack.reversible is not None:
        return "reversible=True (the coupling runs two streams, not one per block)"
    if stack.stream_emb is not None:
        return "hyper-connections / gated_multi_residual (several residual streams enter each block)"
    if repeat_blocks is not None:
        return "repeat_blocks (a rerun unit has no single depth)"
    return None


def prepare(stack, transforms, hiddens: list | None, repeat_blocks) -> BlockIO | None:
    """The stack's per-call BlockIO (None when neither is asked), refusals raised before any work."""
    if transforms is None and hiddens is None:
        return None
    from .layout import unit_length
    starts = {}
    if transforms is not None:
        why = stack_refusal(stack, repeat_blocks)
        if why is not None:
            raise ValueError(f"{ARG} is not supported with {why}")
        unit = unit_length(stack.cfg)
        starts = {(d - 1) * unit: checked(fn, d) for d, fn in resolve(transforms, block_count(stack)).items()}
    keep = hiddens if stack.reversible is None and repeat_blocks is None else None
    unit = unit_length(stack.cfg)
    n = len(stack.layout)
    ends = frozenset(i for i in range(n) if (i + 1) % unit == 0 or i == n - 1)
    return BlockIO(starts=starts, ends=ends, hiddens=keep)


def finish(io: BlockIO | None, x: Tensor) -> Tensor:
    """The stack's final output (after its final norm) replaces the last block's entry, as upstream."""
    if io is not None and io.hiddens:
        io.hiddens[-1] = x
    return x


def wrapper_split(wrapper, transforms, want_hiddens: bool, recycle_steps=None, repeat_blocks=None):
    """A TransformerWrapper's call -> (depth 1's fn for the token embeddings or None, the stack's keywords).
    Refusals (funnel, looped, recycling, the stack's) raised before any work."""
    from .funnel import FunnelEncoder
    looped_or_recycled = wrapper.exit_gate is not None or wrapper.recycled_proj is not None or recycle_steps is not None
    funnel = isinstance(wrapper.attn_layers, FunnelEncoder)
    if transforms is not None:
        why = ("a FunnelEncoder (its blocks change the sequence length)" if funnel else
               "looped / recycling (the stack runs several times per call)" if looped_or_recycled else None)
        if why is not None:
            raise ValueError(f"{ARG} is not supported with {why}")
        why = stack_refusal(wrapper.attn_layers, repeat_blocks)
        if why is not None:
            raise ValueError(f"{ARG} is not supported with {why}")
    kw = {}
    if want_hiddens and not funnel and not looped_or_recycled:
        kw.update(block_hiddens=[], layer_hiddens=[])
    if transforms is None:
        return None, kw
    per_depth = resolve(transforms, block_count(wrapper.attn_layers))
    first = per_depth.pop(1, None)
    if per_depth:
        kw[ARG] = per_depth
    return (checked(first, 1) if first is not None else None), kw


def record(stack, inter, side: dict):
    """A wrapper's intermediates: ``block_hiddens``, and upstream's ``hiddens`` (each self-attention block's
    input) and ``layer_hiddens`` (each block's input, then the output), where the call collected them."""
    blocks, layers = side.get("block_hiddens") or None, side.get("layer_hiddens") or None
    inter.block_hiddens = blocks
    inter.hiddens = [h for h, spec in zip(layers, stack.layout) if spec.kind == "a"] if layers else None
    inter.layer_hiddens = layers + [blocks[-1]] if layers and blocks else None
