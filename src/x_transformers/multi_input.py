"""``MultiInputTransformerWrapper``: several token streams of one sequence (a note, its pitch, its
tone), each with its own vocabulary, embedded and summed into one stack, with one output head per
stream. With a single stream it is :class:`~x_transformers.wrappers.TransformerWrapper`.

Legend: b batch, n tokens, M memory tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .hub import Pretrained
from .layers import AttentionLayers, check_mask, default_positions
from .positional import AbsolutePositionalEmbedding, SinusoidalPositionalEmbedding


class MultiInputTransformerWrapper(Pretrained, nn.Module):
    """``num_tokens``: {name: vocabulary size}; ``forward({name: (b, n) ids}, mask=None)`` returns
    {name: (b, n, vocab) logits}, or the hidden states (b, n, dim) with ``return_embeddings`` /
    ``return_only_embed``. Positions (learned unless the stack carries its own, or scaled
    sinusoidal) count kept tokens as in TransformerWrapper; memory tokens are prepended."""

    def __init__(self, *, num_tokens: dict[str, int], max_seq_len: int | None, attn_layers: AttentionLayers,
                 emb_dim: int | None = None, emb_dropout: float = 0.0, num_memory_tokens: int | None = None,
                 return_only_embed: bool = False, use_abs_pos_emb: bool = True, scaled_sinu_pos_emb: bool = False):
        super().__init__()
        if not isinstance(num_tokens, dict) or not num_tokens:
            raise ValueError("num_tokens must be a non-empty dict {input name: vocabulary size}")
        for name, size in num_tokens.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"num_tokens[{name!r}] must be an integer >= 1, got {size!r}")
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"attn_layers must be an Encoder, Decoder or AttentionLayers, got {type(attn_layers).__name__}")
        dim = attn_layers.dim
        emb_dim = emb_dim or dim
        self.num_tokens = dict(num_tokens)
        self.max_seq_len = max_seq_len
        self.attn_layers = attn_layers
        self.embeds = nn.ModuleDict({name: nn.Embedding(size, emb_dim) for name, size in num_tokens.items()})
        for emb in self.embeds.values():
            nn.init.normal_(emb.weight, std=0.02)
        self.pos_emb = None
        if scaled_sinu_pos_emb:
            self.pos_emb = SinusoidalPositionalEmbedding(emb_dim, scaled=True)
        elif use_abs_pos_emb and not attn_layers.cfg.has_positions and max_seq_len:
            self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout) if emb_dropout > 0 else nn.Identity()
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.num_memory_tokens = M = num_memory_tokens or 0
        self.memory_tokens = nn.Parameter(torch.randn(M, dim) * 0.02) if M else None
        self.to_logits = None if return_only_embed else nn.ModuleDict(
            {name: nn.Linear(dim, size, bias=False) for name, size in num_tokens.items()})

    def _check(self, x: dict) -> tuple[int, int]:
        if not isinstance(x, dict) or set(x) != set(self.embeds):
            got = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"expected a dict of token ids with keys {sorted(self.embeds)}, got {got}")
        shapes = {name: tuple(t.shape) for name, t in x.items()}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
            raise ValueError(f"every input must be (batch, seq) and of the same shape, got {shapes}")
        for name, t in x.items():
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"input {name!r} must hold integer token ids, got {t.dtype}")
            if t.numel() and (t.min() < 0 or t.max() >= self.num_tokens[name]):
                raise ValueError(f"input {name!r} has ids outside [0, {self.num_tokens[name]})")
        return next(iter(shapes.values()))

    def forward(self, x: dict[str, Tensor], mask: Tensor | None = None, *, return_embeddings: bool = False,
                context: Tensor | None = None, context_mask: Tensor | None = None):
        b, n = self._check(x)
        check_mask(mask, b, n)
        device = next(iter(x.values())).device
        positions = default_positions(mask, n, device)
        h = sum(self.embeds[name](ids) for name, ids in x.items())
        if self.pos_emb is not None:
            if isinstance(self.pos_emb, AbsolutePositionalEmbedding) and n > self.max_seq_len:
                raise ValueError(f"sequence length {n} exceeds max_seq_len ({self.max_seq_len})")
            h = h + self.pos_emb(positions)
        h = self.project_emb(self.emb_dropout(h))
        M = self.num_memory_tokens
        layer_positions = positions + M
        if M:  # memory tokens at positions 0..M-1, the sequence after them (as in TransformerWrapper)
            h = torch.cat((self.memory_tokens.to(h.dtype).expand(b, -1, -1), h), dim=1)
            mem_pos = torch.arange(M, device=device)[None].expand(layer_positions.shape[0], -1)
            layer_positions = torch.cat((mem_pos, layer_positions), dim=-1)
            if mask is not None:
                mask = torch.cat((torch.ones(b, M, dtype=torch.bool, device=device), mask), dim=-1)
        out = self.attn_layers(h, mask, context, context_mask, positions=layer_positions)[:, M:]
        if return_embeddings or self.to_logits is None:
            return out
        return {name: head(out) for name, head in self.to_logits.items()}
