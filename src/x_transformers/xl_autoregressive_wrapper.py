"""Upstream's module path ``x_transformers.xl_autoregressive_wrapper``: ``XLAutoregressiveWrapper``,
next-token training and generation over segments with Transformer-XL memories (1901.02860;
recurrence.py holds the mechanism).

A sequence longer than the model's ``max_seq_len`` is cut into segments of ``max_seq_len``; each
segment reads the memories its predecessors left (``max_mem_len`` columns per self-attention
block, set on the ``TransformerWrapper``). The loss is the mean of the segments' losses weighted by
their lengths, as upstream. Memories are detached after every ``tbptt_steps`` segments (1: every
segment, so no gradient crosses a segment boundary).

``generate`` reads the prompt segment by segment, then decodes with a key/value cache inside the
current segment; when a segment fills, its memories are computed from the whole segment, exactly
as training computes them, so a generated token is what the segment-wise forward predicts.
Upstream's test-time training (``ttt_*``) and episodic memories are not built here: their keywords
are accepted only at upstream's defaults.

Legend: b batch, n tokens, L max_seq_len (the segment length), v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .autoregressive_wrapper import top_k
from .layers import AttentionLayers
from .sampling import check_temperature
from .wrappers import TransformerWrapper

__all__ = ["XLAutoregressiveWrapper"]

# upstream's test-time-training / episodic-memory keywords -> their defaults (accepted only at them)
_NOT_BUILT = dict(ttt_module_paths=(), ttt_lr=1e-3, ttt_wd=0.01, ttt_use_muon=False, ttt_muon_steps=5,
                  ttt_muon_lr=1e-2, ttt_low_rank_paths=(), ttt_custom_loss_module=None, ttt_next_latent_loss=False,
                  episodic_mem_len=0)


class XLAutoregressiveWrapper(nn.Module):
    """Segment-wise next-token loss and generation for a ``TransformerWrapper`` over a ``Decoder``."""

    def __init__(self, net: TransformerWrapper, ignore_index: int = -100, pad_value: int = 0, tbptt_steps: int = 1,
                 **upstream):
        super().__init__()
        for key, value in upstream.items():
            if key not in _NOT_BUILT:
                raise TypeError(f"XLAutoregressiveWrapper got an unexpected keyword {key!r}")
            default = _NOT_BUILT[key]
            if not (value is default or (type(value) is type(default) and value == default)):
                raise ValueError(f"XLAutoregressiveWrapper: {key}={value!r} asks for upstream's test-time training / "
                                 f"episodic memory, which is not implemented here; only {default!r} is accepted")
        if not isinstance(net, TransformerWrapper) or not isinstance(net.attn_layers, AttentionLayers) \
                or not net.attn_layers.causal:
            raise TypeError("XLAutoregressiveWrapper needs a TransformerWrapper over a Decoder (a causal stack)")
        if not net.max_seq_len:
            raise ValueError("XLAutoregressiveWrapper cuts sequences into segments of the net's max_seq_len; "
                             "build the TransformerWrapper with max_seq_len > 0")
        if isinstance(tbptt_steps, bool) or not isinstance(tbptt_steps, int) or tbptt_steps < 1:
            raise ValueError(f"tbptt_steps must be an integer >= 1, got {tbptt_steps!r}")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.ignore_index, self.pad_value, self.tbptt_steps = ignore_index, pad_value, tbptt_steps

    def forward(self, x, mems=None, dropout_mems: bool = False, ttt_recurrent_steps: int = 1, **kwargs):
        """x (b, n + 1) token ids -> the next-token loss over segments of ``max_seq_len``.

        ``mems``: memories to start from; ``dropout_mems``: every segment runs without memories
        (upstream's regulariser); other keywords go to the net on every segment."""
        if ttt_recurrent_steps != 1:
            raise ValueError("ttt_recurrent_steps needs upstream's test-time training, which is not implemented here")
        if x.ndim != 2 or x.shape[1] < 2:
            raise ValueError(f"x must be token ids (b, n + 1) with at least 2 tokens, got {tuple(x.shape)}")
        inp, labels = x[:, :-1], x[:, 1:]
        n = inp.shape[1]
        total = 0.0
        for i, (chunk, target) in enumerate(zip(inp.split(self.max_seq_len, dim=1),
                                                labels.split(self.max_seq_len, dim=1))):
            detach = (i + 1) % self.tbptt_steps == 0
            logits, mems = self.net(chunk, mems=None if dropout_mems else mems, return_mems=True, detach_mems=detach,
                                    **kwargs)
            loss = F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=self.ignore_index,
                                   reduction="none")  # (b, n_chunk)
            keep = target != self.ignore_index
            per_row = (loss * keep).sum(dim=-1) / keep.sum(dim=-1).clamp(min=1)
            total = total + per_row.mean() * (chunk.shape[1] / n)
        return total

    @torch.no_grad()
    def generate(self, start_tokens, seq_len: int, eos_token=None, temperature: float = 1.0, filter_logits_fn=top_k,
                 filter_kwargs: dict | None = None, mems=None, **kwargs):
        """Continue ``start_tokens`` (b, t) or (t,) by ``seq_len`` tokens -> (b, seq_len) or (seq_len,).

        Temperature 0 is greedy; otherwise ``filter_logits_fn(logits, **filter_kwargs)`` then a draw
        at ``temperature`` (upstream's order). With ``eos_token``, decoding stops once every row has
        produced it, and each row's tokens after its first eos become ``pad_value``."""
        check_temperature(temperature)
        squeeze = start_tokens.ndim == 1
        out = start_tokens[None] if squeeze else start_tokens
        if out.ndim != 2 or out.shape[1] == 0:
            raise ValueError(f"start_tokens must be token ids (b, t) or (t,) with t >= 1, got {tuple(start_tokens.shape)}")
        L, t = self.max_seq_len, out.shape[1]
        was_training = self.net.training
        self.net.eval()
        try:
            start = (t - 1) // L * L  # the segment holding the last prompt token
            for s in range(0, start, L):  # the prompt's complete segments leave their memories
                _, mems = self.net(out[:, s:s + L], mems=mems, return_mems=True, **kwargs)
            cache = None
            for _ in range(seq_len):
                logits, cache = self.net(out[:, start:], mems=mems, cache=cache, return_intermediates=True, **kwargs)
                token = self._sample(logits[:, -1], temperature, filter_logits_fn, filter_kwargs or {})
                out = torch.cat((out, token[:, None]), dim=-1)
                if out.shape[1] - start > L:  # the new token opens the next segment
                    _, mems = self.net(out[:, start:start + L], mems=mems, return_mems=True, **kwargs)
                    start, cache = start + L, None
                if eos_token is not None and (out[:, t:] == eos_token).any(dim=-1).all():
                    break
        finally:
            self.net.train(was_training)
        gen = out[:, t:]
        if eos_token is not None:
            after = (gen == eos_token).long().cumsum(dim=-1) - (gen == eos_token).long() > 0
            gen = gen.masked_fill(after, self.pad_value)
        return gen[0] if squeeze else gen

    @staticmethod
    def _sample(logits, temperature, filter_logits_fn, filter_kwargs):
        if temperature == 0:
            return logits.argmax(dim=-1)
        filtered = filter_logits_fn(logits.float(), **filter_kwargs) if filter_logits_fn is not None else logits.float()
        return torch.multinomial((filtered / temperature).softmax(dim=-1), 1).squeeze(-1)
