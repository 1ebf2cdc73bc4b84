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
Test-time training (``ttt_*``, upstream's keywords and defaults; the mechanism is in ttt.py): the
chosen modules carry per-row weights that take one gradient step on each segment's loss before the
next segment is read (in ``generate``: on the prompt). Episodic memories (``episodic_mem_len`` m > 0):
m learned key/value columns that every self-attention block reads first, which TTT may train
(the path ``episodic_mems``; the net's paths are then under ``net.``, as upstream).

Legend: b batch, n tokens, L max_seq_len (the segment length), v vocabulary.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .autoregressive_wrapper import top_k
from .layers import AttentionLayers
from .sampling import check_temperature
from .ttt import (EpisodicMemories, LowRankLinear, TTTMetaLearningTargetKLLoss, TTTModuleWrapper, TTTNextLatentPredictionLoss,
                  TTTSetup)
from .wrappers import TransformerWrapper

__all__ = ["XLAutoregressiveWrapper", "TTTModuleWrapper", "LowRankLinear", "TTTMetaLearningTargetKLLoss",
           "TTTNextLatentPredictionLoss"]


class XLAutoregressiveWrapper(nn.Module):
    """Segment-wise next-token loss and generation for a ``TransformerWrapper`` over a ``Decoder``."""

    def __init__(self, net: TransformerWrapper, ignore_index: int = -100, pad_value: int = 0, tbptt_steps: int = 1,
                 ttt_module_paths=(), ttt_lr: float = 1e-3, ttt_wd: float = 0.01, ttt_use_muon: bool = False,
                 ttt_muon_steps: int = 5, ttt_muon_lr: float = 1e-2, ttt_low_rank_paths=(),
                 ttt_custom_loss_module: nn.Module | None = None, ttt_next_latent_loss: bool = False,
                 episodic_mem_len: int = 0):
        super().__init__()
        if ttt_custom_loss_module is not None and not isinstance(ttt_custom_loss_module, nn.Module):
            raise ValueError("ttt_custom_loss_module must be an nn.Module (intermediates, mask) -> per-token losses")
        if not isinstance(ttt_next_latent_loss, bool):
            raise ValueError(f"ttt_next_latent_loss must be a bool, got {ttt_next_latent_loss!r}")
        if ttt_next_latent_loss and ttt_custom_loss_module is not None:
            raise ValueError("ttt_custom_loss_module and ttt_next_latent_loss cannot both be set")
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
        if (ttt_module_paths or ttt_low_rank_paths) and tbptt_steps == 1:
            raise ValueError("test-time training (ttt_module_paths / ttt_low_rank_paths) needs tbptt_steps > 1")
        episodic = EpisodicMemories.for_stack(net.attn_layers, episodic_mem_len)
        self.has_episodic_mem = episodic is not None
        if self.has_episodic_mem:
            self.episodic_mems = episodic
        self.ttt = TTTSetup(self if self.has_episodic_mem else net, ttt_module_paths, ttt_low_rank_paths, ttt_lr, ttt_wd,
                            ttt_use_muon, ttt_muon_steps, ttt_muon_lr, prefix="net." if self.has_episodic_mem else "")
        if ttt_next_latent_loss:
            ttt_custom_loss_module = TTTNextLatentPredictionLoss(dim=net.attn_layers.dim)
        self.ttt_custom_loss_module = ttt_custom_loss_module

    @property
    def has_ttt(self) -> bool:
        return bool(self.ttt.wrappers)

    @property
    def ttt_wrappers(self) -> dict:
        """The given path -> its ``TTTModuleWrapper`` (upstream's attribute)."""
        return self.ttt.wrappers

    @property
    def ttt_paths_map(self) -> tuple:
        """The (source, target) path pairs of the inner step (upstream's attribute)."""
        return self.ttt.paths_map

    def init_ttt(self, batch: int):
        """Give every test-time-trained module one copy of its parameters per row."""
        with torch.enable_grad():
            self.ttt.init(batch)

    def _row_loss(self, logits, target):
        """-> (b,) each row's mean next-token loss over its labels that are not ``ignore_index``."""
        loss = F.cross_entropy(logits.transpose(1, 2).float(), target, ignore_index=self.ignore_index, reduction="none")
        keep = target != self.ignore_index
        return (loss * keep).sum(dim=-1) / keep.sum(dim=-1).clamp(min=1)

    def update_ttt(self, logits, target, create_graph: bool = False, intermediates=None):
        """One inner step of every row on this segment: the next-token loss, or the custom loss
        (``intermediates``, mask) -> (b, n) or (b,) averaged over the labelled tokens."""
        if not self.has_ttt:
            return
        if self.ttt_custom_loss_module is None:
            loss = self._row_loss(logits, target)
        else:
            keep = target != self.ignore_index
            loss = self.ttt_custom_loss_module(intermediates, mask=keep)
            if loss.ndim > 1:
                loss = (loss * keep).sum(dim=-1) / keep.sum(dim=-1).clamp(min=1)
        self.ttt.step(loss, create_graph)

    def forward(self, x, mems=None, dropout_mems: bool = False, ttt_recurrent_steps: int = 1, **kwargs):
        """x (b, n + 1) token ids -> the next-token loss over segments of ``max_seq_len``.

        ``mems``: memories to start from; ``dropout_mems``: every segment runs without memories
        (upstream's regulariser); other keywords go to the net on every segment.

        With test-time training, every segment but the last is followed by one inner step per row
        (kept in the graph in training mode); ``ttt_recurrent_steps`` k > 1 runs each segment k
        times, stepping after each run, and the last run's loss and memories count."""
        if isinstance(ttt_recurrent_steps, bool) or not isinstance(ttt_recurrent_steps, int) or ttt_recurrent_steps < 1:
            raise ValueError(f"ttt_recurrent_steps must be an integer >= 1, got {ttt_recurrent_steps!r}")
        if ttt_recurrent_steps > 1 and not self.has_ttt:
            raise ValueError("ttt_recurrent_steps > 1 needs test-time training (ttt_module_paths)")
        self._check_kwargs(kwargs)
        if x.ndim != 2 or x.shape[1] < 2:
            raise ValueError(f"x must be token ids (b, n + 1) with at least 2 tokens, got {tuple(x.shape)}")
        inp, labels = x[:, :-1], x[:, 1:]
        n = inp.shape[1]
        chunks = list(zip(inp.split(self.max_seq_len, dim=1), labels.split(self.max_seq_len, dim=1)))
        total = 0.0
        # in training the inner steps stay in the graph, so the outer backward differentiates through
        # attention twice: only SDPA's math kernel has that double backward
        double = self.has_ttt and self.training
        with torch.enable_grad() if self.has_ttt else nullcontext(), \
                sdpa_kernel([SDPBackend.MATH]) if double else nullcontext():
            self.init_ttt(x.shape[0])
            for i, (chunk, target) in enumerate(chunks):
                detach = (i + 1) % self.tbptt_steps == 0
                for step in range(ttt_recurrent_steps):
                    final = step == ttt_recurrent_steps - 1
                    out = self._net(chunk, mems=None if dropout_mems else mems, return_mems=True, detach_mems=detach,
                                   return_intermediates=self.has_ttt, **kwargs)
                    logits, inter = out if self.has_ttt else (out[0], None)
                    if final:
                        mems = inter.mems if self.has_ttt else out[1]
                        total = total + self._row_loss(logits, target).mean() * (chunk.shape[1] / n)
                    if self.has_ttt and not (final and i == len(chunks) - 1):
                        self.update_ttt(logits, target, create_graph=self.training, intermediates=inter)
                if detach and self.has_ttt:
                    self.ttt.detach()
        return total

    @torch.no_grad()
    def generate(self, start_tokens, seq_len: int, eos_token=None, temperature: float = 1.0, filter_logits_fn=top_k,
                 filter_kwargs: dict | None = None, mems=None, **kwargs):
        """Continue ``start_tokens`` (b, t) or (t,) by ``seq_len`` tokens -> (b, seq_len) or (seq_len,).

        Temperature 0 is greedy; otherwise ``filter_logits_fn(logits, **filter_kwargs)`` then a draw
        at ``temperature`` (upstream's order). With ``eos_token``, decoding stops once every row has
        produced it, and each row's tokens after its first eos become ``pad_value``."""
        check_temperature(temperature)
        self._check_kwargs(kwargs)
        squeeze = start_tokens.ndim == 1
        out = start_tokens[None] if squeeze else start_tokens
        if out.ndim != 2 or out.shape[1] == 0:
            raise ValueError(f"start_tokens must be token ids (b, t) or (t,) with t >= 1, got {tuple(start_tokens.shape)}")
        L, t = self.max_seq_len, out.shape[1]
        was_training = self.net.training
        self.net.eval()
        try:
            start = (t - 1) // L * L  # the segment holding the last prompt token
            self.init_ttt(out.shape[0])
            for s in range(0, start, L):  # the prompt's complete segments leave their memories
                mems = self._read_prompt(out[:, s:s + L], out[:, s + 1:s + L + 1], mems, kwargs)
            if self.has_ttt and t - start > 1:  # test-time train on the rest of the prompt too
                self._read_prompt(out[:, start:-1], out[:, start + 1:], mems, kwargs)
            cache = None
            for _ in range(seq_len):
                logits, cache = self._net(out[:, start:], mems=mems, cache=cache, return_intermediates=True, **kwargs)
                token = self._sample(logits[:, -1], temperature, filter_logits_fn, filter_kwargs or {})
                out = torch.cat((out, token[:, None]), dim=-1)
                if out.shape[1] - start > L:  # the new token opens the next segment
                    _, mems = self._net(out[:, start:start + L], mems=mems, return_mems=True, **kwargs)
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

    def _net(self, x, **kwargs):
        """The net on x, with the episodic memories (per row when test-time trained) as extra keys/values."""
        if self.has_episodic_mem:
            kwargs["self_attn_additional_kv"] = EpisodicMemories.as_additional_kv(self.episodic_mems(), x.shape[0])
        return self.net(x, **kwargs)

    def _check_kwargs(self, kwargs):
        if self.has_episodic_mem and "self_attn_additional_kv" in kwargs:
            raise ValueError("self_attn_additional_kv: the episodic memories (episodic_mem_len) already supply them")

    def _read_prompt(self, segment, target, mems, kwargs):
        """Run a prompt segment (with test-time training: and take the inner step on it) -> its memories."""
        if not self.has_ttt:
            return self._net(segment, mems=mems, return_mems=True, **kwargs)[1]
        with torch.enable_grad():
            logits, inter = self._net(segment, mems=mems, return_mems=True, return_intermediates=True, **kwargs)
            self.update_ttt(logits, target, create_graph=False, intermediates=inter)
        return inter.mems

    @staticmethod
    def _sample(logits, temperature, filter_logits_fn, filter_kwargs):
        if temperature == 0:
            return logits.argmax(dim=-1)
        filtered = filter_logits_fn(logits.float(), **filter_kwargs) if filter_logits_fn is not None else logits.float()
        return torch.multinomial((filtered / temperature).softmax(dim=-1), 1).squeeze(-1)
