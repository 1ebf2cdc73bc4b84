"""Funnel Transformer encoder (2006.03236): blocks of layers with the sequence halved between them.

Between blocks the sequence is mean-pooled with window and stride 2. Pooling is query-only: the
first self-attention of a new block takes the pooled sequence as queries and attends over the
unpooled keys/values of the previous block; the remaining layers of the block see only the pooled
sequence. With ``upsample=True`` a short decoder repeats the compressed sequence back to the
input's length, adds the first block's output and runs a few more layers, as in the paper.

Rules under pooling (each holds at every level):
- mask: a pooled position is kept if any of its sources is kept; a pooled value is the mean of
  its *kept* sources only, so right padding changes no kept output (left padding moves the
  windows unless its length is a multiple of 2 ** (len(depths) - 1)).
- odd lengths: the last window holds one source; the output length is ceil(n / 2) per pooling.
- ``separate_cls``: the first token is never pooled (length 1 + ceil((n - 1) / 2)); it must be
  kept (pad on the right).
- memory tokens (``TransformerWrapper(num_memory_tokens=M)``, passed as ``forward(...,
  num_memory_tokens=M)``) lead the sequence and are never pooled either: every block sees all M,
  and the pooling windows start at the first real token (after them the separate [CLS], if any),
  exactly as without memory tokens.
- positions: a pooled token sits at the position of its first kept source (the paper's stride
  pooling of position ids), in units of input tokens, so rotary, ALiBi and T5 buckets keep
  measuring distances between input positions, and TUPE reads its table at input positions
  (with ``tupe_untie_cls`` and no ``separate_cls``, the first pooled token, at position 0, is the
  untied [CLS]).
- a block without self-attention (``only_cross``, a ``custom_layers`` without ``a``, or
  ``top_attn_to_ff`` as deep as the block) has no query to pool: it runs over the mean-pooled
  sequence.
- shared-QK: the pooled queries' keys are the unit-normalised query projections of the unpooled
  sequence; no key is a pooled query's own, so none takes Reformer's self penalty.
- ``reversible``: each block is its own reversible coupling; the unpooled keys/values of the
  first self-attention are an input of the block, like a cross-attention context, so every step
  still inverts exactly.

Each block is an :class:`~x_transformers.layers.Encoder` built from the same keywords, so every
attention / feed-forward / norm / positional keyword of ``Encoder`` applies; relative-position
tables (T5, TUPE) are per block. Each block runs through its own ``Encoder.run`` (the shared block
runner, blocks.py, plain or reversible): the funnel only adds to the block's forward context the
sequence its first self-attention takes keys/values from.

Legend: b batch, n tokens at the current level, m tokens of the previous level (keys), d dim.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .hub import Pretrained
from . import aliases, conflicts
from .config import AttentionConfig, FeedForwardConfig, LayersConfig, field_names, unknown_keyword
from .layers import Encoder, check_stack_inputs, default_positions


DEFAULT_DEPTHS = (4, 4, 4)


@dataclass(frozen=True, kw_only=True)
class FunnelConfig:
    """The funnel's own keywords; everything else is an ``Encoder`` keyword for every block."""

    depths: tuple[int, ...] = DEFAULT_DEPTHS  # layers per block; the sequence halves between blocks
    separate_cls: bool = False  # the first token (CLS) is never pooled, as in 2006.03236
    upsample: bool = False  # decoder back to the input length, for token-level outputs (2006.03236 sec. 2.3)
    upsample_depth: int | None = None  # layers of that decoder; default 2 as in the paper

    def __post_init__(self):
        if isinstance(self.depths, (str, bytes)) or not hasattr(self.depths, "__len__") or not self.depths:
            raise ValueError(f"depths must be a non-empty sequence of layer counts, got {self.depths!r}")
        for d in self.depths:
            if not isinstance(d, int) or isinstance(d, bool) or d < 1:
                raise ValueError(f"depths must hold integers >= 1, got {self.depths!r}")
        if self.upsample_depth is not None:  # (without upsample: conflicts.py)
            if not isinstance(self.upsample_depth, int) or isinstance(self.upsample_depth, bool) or self.upsample_depth < 1:
                raise ValueError(f"upsample_depth must be an integer >= 1, got {self.upsample_depth!r}")

    @property
    def poolings(self) -> int:
        return len(self.depths) - 1


def _valid_keywords() -> list[str]:
    return (sorted(field_names(FunnelConfig)) + sorted(field_names(LayersConfig) - {"dim", "depth"})
            + ["attn_" + n for n in sorted(field_names(AttentionConfig))]
            + ["ff_" + n for n in sorted(field_names(FeedForwardConfig))])


def pool_mask(mask, lead: int):
    """(b, n) bool -> (b, lead + ceil((n - lead) / 2)) bool: the first ``lead`` positions (memory
    tokens, a separate [CLS]) stay; a pooled position is kept if any of its sources is kept."""
    if mask is None:
        return None
    head, rest = mask[:, :int(lead)], mask[:, int(lead):]
    rest = F.pad(rest, (0, rest.shape[1] % 2), value=False)
    pooled = rest.view(rest.shape[0], -1, 2).any(dim=-1)
    return torch.cat((head, pooled), dim=1)


def mean_pool(x, mask, positions, lead: int):
    """Mean-pool x (b, n, d) with window and stride 2 over kept sources only; the first ``lead``
    positions (memory tokens, a separate [CLS]) are never pooled.

    mask: (b, n) bool or None; positions: (b|1, n) long. Returns pooled x, mask and positions
    (each pooled token at its first kept source's position).
    """
    lead = int(lead)
    head_x, head_p = x[:, :lead], positions[:, :lead]
    head_m = None if mask is None else mask[:, :lead]
    x, positions = x[:, lead:], positions[:, lead:]
    mask = None if mask is None else mask[:, lead:]
    b, n, d = x.shape
    keep = mask if mask is not None else torch.ones(1, n, dtype=torch.bool, device=x.device)
    odd = n % 2  # the padded slot is no source: the last window then holds one token
    keep2 = F.pad(keep, (0, odd), value=False).view(keep.shape[0], -1, 2)  # (b|1, n/2, 2)
    x2 = F.pad(x, (0, 0, 0, odd)).view(b, -1, 2, d)  # (b, n/2, 2, d)
    pos2 = F.pad(positions, (0, odd)).view(positions.shape[0], -1, 2)

    w = keep2.to(x.dtype)[..., None]  # (b|1, n/2, 2, 1)
    pooled = (x2 * w).sum(dim=2) / w.sum(dim=2).clamp(min=1)  # fully padded windows give 0
    first_kept = keep2[..., 0] | ~keep2[..., 1]
    pooled_pos = torch.where(first_kept, pos2[..., 0], pos2[..., 1])
    pooled_mask = keep2.any(dim=-1) if mask is not None else None

    if lead:
        pooled = torch.cat((head_x, pooled), dim=1)
        rows = max(pooled_pos.shape[0], head_p.shape[0])
        pooled_pos = torch.cat((head_p.expand(rows, -1), pooled_pos.expand(rows, -1)), dim=1)
        if pooled_mask is not None:
            pooled_mask = torch.cat((head_m, pooled_mask), dim=1)
    return pooled, pooled_mask, pooled_pos


def upsample_index(n: int, poolings: int, lead: int, device):
    """For each of n input positions, the index of the token that holds it after the poolings
    (the first ``lead`` positions are never pooled)."""
    i, lead = torch.arange(n, device=device), int(lead)
    return torch.where(i < lead, i, lead + ((i - lead) >> poolings))


def _block_context(block: Encoder, mask, positions, context, context_mask, kv=None, need_weights=False):
    """The forward context of one block over tokens at ``positions`` (b|1, n). With kv = (seq (b, m, d),
    mask, positions), the block's first self-attention takes its keys/values from that unpooled
    sequence, with rotary angles and position bias (T5, TUPE) between pooled and unpooled positions."""
    ctx = block.forward_context(positions, self_mask=mask[:, None, None, :] if mask is not None else None,
                                context=context, context_mask=context_mask, need_weights=need_weights)
    if kv is None:
        return ctx
    first = next((i for i, spec in enumerate(block.layout) if spec.kind == "a"), None)
    if first is None:  # no self-attention to take the unpooled keys: the block reads the pooled sequence
        return ctx
    src, src_mask, src_pos = kv
    return replace(ctx, kv=src, kv_block=first, kv_mask=src_mask[:, None, None, :] if src_mask is not None else None,
                   kv_rotary=block.rotary(src_pos) if block.rotary is not None else None,
                   kv_score_mod=block.score_mod(positions, src_pos))


class FunnelEncoder(Pretrained, nn.Module):
    """Funnel Transformer encoder (2006.03236): ``len(depths)`` blocks, sequence halved between them.

    ``FunnelEncoder(dim, depths=(4, 4, 4), heads=8, separate_cls=False, upsample=False,
    upsample_depth=None, **encoder_keywords)``. Output length: ``output_length(n)``; the output
    mask: ``output_mask(mask)``.
    """

    def __init__(self, dim: int, depths=DEFAULT_DEPTHS, heads: int = 8, **kwargs):
        super().__init__()
        where = type(self).__name__
        kwargs = aliases.resolve(kwargs, "layers", where)  # upstream names -> ours
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names(FunnelConfig)}
        valid = _valid_keywords()
        for key in kwargs:
            if key not in valid:
                raise unknown_keyword(key, valid + ["depths", "heads"], where)
        depths = tuple(depths) if isinstance(depths, list) else depths
        self.cfg = cfg = FunnelConfig(depths=depths, **own)
        conflicts.check("funnel", dict(kwargs, depths=depths, heads=heads, **own))

        self.dim = dim
        self.causal = False
        self.blocks = nn.ModuleList(Encoder(dim, d, heads, **kwargs) for d in cfg.depths)
        self.upsampler = Encoder(dim, cfg.upsample_depth or 2, heads, **kwargs) if cfg.upsample else None

        # GPT-2's residual scaling counts every layer of the funnel, not one block's
        total = sum(cfg.depths) + ((cfg.upsample_depth or 2) if cfg.upsample else 0)
        for stack in self.stacks():
            stack.init_outputs(total)

    def stacks(self):
        """Every Encoder of the funnel: its blocks, then the upsampler."""
        return list(self.blocks) + ([self.upsampler] if self.upsampler is not None else [])

    # the face TransformerWrapper reads
    @property
    def layer_cfg(self):
        """The LayersConfig every block shares (the wrapper reads positional choices from it)."""
        return self.blocks[0].cfg

    @property
    def has_relative_positions(self) -> bool:
        return self.blocks[0].has_relative_positions

    @property
    def needs_context(self) -> bool:
        return self.blocks[0].needs_context

    @property
    def pools_output(self) -> bool:
        """Whether the output is shorter than the input (pooling without upsampling)."""
        return self.cfg.poolings > 0 and not self.cfg.upsample

    def output_length(self, n: int) -> int:
        """The output length for n tokens (memory tokens not counted: they are never pooled)."""
        if self.cfg.upsample:
            return n
        cls = int(self.cfg.separate_cls)
        for _ in range(self.cfg.poolings):
            n = cls + -(-(n - cls) // 2)
        return n

    def output_mask(self, mask):
        """The mask of the output positions: ``mask`` itself with upsampling, else pooled."""
        if mask is None or self.cfg.upsample:
            return mask
        for _ in range(self.cfg.poolings):
            mask = pool_mask(mask, int(self.cfg.separate_cls))
        return mask

    def extra_repr(self):
        return (f"depths={self.cfg.depths}, separate_cls={self.cfg.separate_cls}, upsample={self.cfg.upsample}")

    def forward(self, x, mask=None, context=None, context_mask=None, *, positions=None, cache=None,
                return_attn: bool = False, num_memory_tokens: int = 0):
        """x (b, n, dim) -> (b, output_length(n), dim); with ``return_attn`` also the attention maps.

        mask: (b, n) bool, True = keep. positions: (b|1, n) long, from the mask when omitted.
        ``num_memory_tokens``: the first M tokens of x are memory tokens (TransformerWrapper's),
        never pooled: the output is (b, M + output_length(n - M), dim), the M rows first.
        """
        if cache is not None:
            raise ValueError("FunnelEncoder is a bidirectional encoder: it has no key/value cache")
        check_stack_inputs(self, x, mask, context, context_mask, direct=positions is None)
        b, n, _ = x.shape
        M = num_memory_tokens
        if not isinstance(M, int) or isinstance(M, bool) or not 0 <= M <= n:
            raise ValueError(f"num_memory_tokens must be an integer in [0, {n}] (the sequence's length), got {M!r}")
        lead = M + int(self.cfg.separate_cls)  # never pooled: memory tokens, then the separate [CLS]
        if (self.cfg.separate_cls and mask is not None and not torch.compiler.is_compiling()
                and not bool(mask[:, M].all())):
            raise ValueError("separate_cls keeps the first token unpooled, so it must be kept: pad on the right")
        if positions is None:
            positions = default_positions(mask, n, x.device)
        attns = [] if return_attn else None

        h, h_mask, h_pos = x, mask, positions
        first = None
        for i, block in enumerate(self.blocks):
            kv = None
            if i > 0:  # query-only pooling: pooled queries, keys/values of the previous block
                kv = (h, h_mask, h_pos)
                h, h_mask, h_pos = mean_pool(h, h_mask, h_pos, lead)
            h = block.run(h, _block_context(block, h_mask, h_pos, context, context_mask, kv, return_attn), attns)
            if i == 0:
                first = h

        if self.upsampler is not None:
            # repeat each compressed token over the inputs it covers, add the first block's output
            idx = upsample_index(n, self.cfg.poolings, lead, x.device)
            h = h.index_select(1, idx) + first
            ctx = _block_context(self.upsampler, mask, positions, context, context_mask, None, return_attn)
            h = self.upsampler.run(h, ctx, attns)
        return (h, attns) if return_attn else h
