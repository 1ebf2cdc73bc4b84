"""The Belief State Transformer (Hu et al., "Learning to Achieve Goals with Belief State
Transformers", arXiv 2410.23506), at upstream's module path.

Two causal decoders read one sequence from opposite ends. The forward decoder's state at index
``f`` has seen the prefix ``seq[:f + 1]``; the backward decoder reads the sequence reversed after a
learned suffix token, so its state at index ``s`` (after flipping back) has seen only the suffix
``seq[s:]`` (``s = n``: the empty suffix, the suffix token alone). For every pair with at least
one token between them (``s - f >= 2``) a text head on ``[forward f ; backward s]`` predicts the
prefix's next token ``seq[f + 1]`` and the suffix's previous one ``seq[s - 1]``; the loss is the
cross-entropy over all those pairs (or a random ``train_frac_forward_backward_pairs`` of them).
Generation conditions the forward decoder's next-token choice on the backward state of a goal
suffix (``generate_with_suffix_cond``).

Where we differ from upstream 2.31.10 (each a fix, see docs/features.md): with ``lens`` the
backward states are flipped back over ``len + 1`` places (upstream flips ``len``, so each state
sees one token too few) and pairs whose suffix starts beyond a row's length are ignored;
``loss_weight_by_fb_indices`` applies whatever ``backward_ar_loss_weight`` is, and a weighted loss
is a mean over the labelled pairs only; ``cond_on_distance`` conditions the text head (upstream
multiplies the embeddings after the text head has read them, so the condition reaches no loss).

Legend: b batch, n tokens, p pairs, d dim, v vocabulary.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .sampling import check_filter_kwargs, sample
from .autoregressive_wrapper import min_p
from .wrappers import TransformerWrapper
from .latent_prefix import check_prompts

__all__ = ["BeliefStateWrapper", "flip"]


def flip(x: Tensor, dim: int = 1, lens: Tensor | None = None) -> Tensor:
    """Reverse x (b, n, ...) along ``dim`` (1); with ``lens`` (b,) only each row's first ``lens``
    entries are reversed, the rest (padding) stay where they are."""
    if lens is None:
        return x.flip(dim)
    if dim != 1:
        raise ValueError("flip with lens reverses along dim 1 only")
    n = x.shape[1]
    idx = torch.arange(n, device=x.device)[None, :]  # (1, n)
    lens = lens[:, None].to(idx.dtype)
    src = torch.where(idx < lens, lens - 1 - idx, idx)  # (b, n): where each place reads from
    src = src.view(*src.shape, *([1] * (x.ndim - 2))).expand_as(x)
    return x.gather(1, src)


def _check_decoder(name: str, model) -> TransformerWrapper:
    if not isinstance(model, TransformerWrapper):
        raise TypeError(f"{name} must be a TransformerWrapper, got {type(model).__name__}")
    if not model.can_cache_kv:
        raise ValueError(f"{name} must be causal (a TransformerWrapper over a Decoder): the belief state reads "
                         f"prefixes and suffixes left to right")
    return model


def _fraction(name: str, value, *, low_open: bool = True, high_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        lo, hi = "(0" if low_open else "[0", "1)" if high_open else "1]"
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value!r}")
    return float(value)


def _weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _mlp(dim_in: int, dim: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, dim), nn.LeakyReLU(), nn.Linear(dim, dim_out))


class BeliefStateWrapper(nn.Module):
    """The belief-state objective over a forward and a backward :class:`TransformerWrapper`
    (Figure 13 of 2410.23506). ``forward(seq, lens=None)`` returns the scalar loss."""

    def __init__(self, forward_decoder: TransformerWrapper, backward_decoder: TransformerWrapper | None = None,
                 train_frac_forward_backward_pairs: float = 1.0, text_head: nn.Module | None = None,
                 backward_ar_loss_weight: float = 1.0, pred_distance: bool = False,
                 pred_distance_loss_weight: float = 1.0, cond_on_distance: bool = False,
                 cond_on_distance_prob: float = 0.5, max_pred_distance: int | None = None):
        """``backward_decoder``: default the forward one (one network, told apart by the suffix
        token). ``train_frac_forward_backward_pairs``: the fraction of pairs drawn each step (memory).
        ``text_head``: [forward ; backward] (.., 2 dim) -> (.., 2 num_tokens) next / previous logits.
        ``pred_distance``: also predict the distance ``s - f`` (capped at ``max_pred_distance - 1``,
        default max_seq_len); ``cond_on_distance``: with probability ``cond_on_distance_prob`` a
        step conditions the text head on that distance instead."""
        super().__init__()
        _check_decoder("forward_decoder", forward_decoder)
        backward_decoder = forward_decoder if backward_decoder is None else \
            _check_decoder("backward_decoder", backward_decoder)
        for what in ("emb_dim", "num_tokens"):
            a, b = getattr(forward_decoder, what), getattr(backward_decoder, what)
            if a != b:
                raise ValueError(f"forward_decoder and backward_decoder must have the same {what}, got {a} and {b}")
        if text_head is not None and not isinstance(text_head, nn.Module):
            raise TypeError(f"text_head must be an nn.Module, got {type(text_head).__name__}")
        for name, flag in (("pred_distance", pred_distance), ("cond_on_distance", cond_on_distance)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.train_frac_fb_pairs = _fraction("train_frac_forward_backward_pairs", train_frac_forward_backward_pairs)
        self.backward_ar_loss_weight = _weight("backward_ar_loss_weight", backward_ar_loss_weight)
        self.pred_distance_loss_weight = _weight("pred_distance_loss_weight", pred_distance_loss_weight)
        self.cond_on_distance_prob = _fraction("cond_on_distance_prob", cond_on_distance_prob, high_open=True)
        max_pred_distance = forward_decoder.max_seq_len if max_pred_distance is None else max_pred_distance
        if isinstance(max_pred_distance, bool) or not isinstance(max_pred_distance, int) or max_pred_distance < 2:
            raise ValueError(f"max_pred_distance must be an int >= 2 (distances start at 2), got {max_pred_distance!r}")

        dim = forward_decoder.emb_dim
        self.num_tokens = forward_decoder.num_tokens
        self.max_seq_len = forward_decoder.max_seq_len
        self.max_pred_distance = max_pred_distance
        self.forward_decoder = forward_decoder
        self.backward_decoder = backward_decoder
        # the learned token the backward decoder starts from: its state alone is the empty suffix
        self.suffix_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.text_head = text_head if text_head is not None else _mlp(dim * 2, dim, self.num_tokens * 2)
        self.to_distance_logits = _mlp(dim * 2, dim, max_pred_distance) if pred_distance else None
        self.cond_on_distance = cond_on_distance
        self.to_distance_cond = _mlp(1, dim, dim * 2) if cond_on_distance else None
        self.register_buffer("loss_weights", torch.tensor([1.0, self.backward_ar_loss_weight]), persistent=False)

    # -- the two readings of a sequence ------------------------------------------------------

    def _suffix_tokens(self, batch: int) -> Tensor:
        return self.suffix_token.view(1, 1, -1).expand(batch, 1, -1)  # (b, 1, d)

    def belief_embeds(self, seq: Tensor, lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """seq (b, n) -> (forward (b, n, d): index f has read seq[:f + 1]; backward (b, n + 1, d):
        index s has read seq[s:len] (s = len: the suffix token alone))."""
        forward = self.forward_decoder(seq, return_embeddings=True)
        reverse = flip(seq, lens=lens)  # (b, n): each row's first len tokens reversed
        backward = self.backward_decoder(reverse, prepend_embeds=self._suffix_tokens(seq.shape[0]),
                                         return_embeddings=True)  # (b, n + 1, d), suffix token first
        return forward, flip(backward, lens=None if lens is None else lens + 1)

    # -- training ------------------------------------------------------------------------------

    def _check_inputs(self, seq, lens):
        if not isinstance(seq, Tensor) or seq.ndim != 2 or seq.dtype not in (torch.long, torch.int):
            raise ValueError(f"seq must be a (batch, n) tensor of token ids, got "
                             f"{getattr(seq, 'dtype', type(seq).__name__)} {tuple(getattr(seq, 'shape', ()))}")
        b, n = seq.shape
        if n < 2:
            raise ValueError(f"seq must have at least 2 tokens (a prefix and a suffix), got {n}")
        if lens is None:
            return
        if not isinstance(lens, Tensor) or lens.shape != (b,) or lens.is_floating_point() or lens.dtype == torch.bool:
            raise ValueError(f"lens must be a ({b},) integer tensor of sequence lengths, got "
                             f"{getattr(lens, 'dtype', type(lens).__name__)} {tuple(getattr(lens, 'shape', ()))}")
        if bool(((lens < 2) | (lens > n)).any()):
            raise ValueError(f"lens must lie in [2, {n}] (the sequence length), got {lens.tolist()}")

    def _pairs(self, n: int, device) -> Tensor:
        """The (forward, backward) index pairs (p, 2) with at least one token between them."""
        f, s = torch.meshgrid(torch.arange(n, device=device), torch.arange(1, n + 1, device=device), indexing="ij")
        pairs = torch.stack((f.flatten(), s.flatten()), dim=-1)
        pairs = pairs[pairs[:, 1] - pairs[:, 0] >= 2]
        if self.train_frac_fb_pairs < 1:
            keep = max(int(pairs.shape[0] * self.train_frac_fb_pairs), 1)
            pairs = pairs[torch.randperm(pairs.shape[0], device=device)[:keep]]
        return pairs

    def forward(self, seq: Tensor, lens: Tensor | None = None,
                loss_weight_by_fb_indices: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """seq (b, n) token ids (``lens`` (b,): each row's length, right padding) -> the loss.
        ``loss_weight_by_fb_indices``: pairs (p, 2) -> weights (p,) or (p, 2) (forward, backward)."""
        self._check_inputs(seq, lens)
        if loss_weight_by_fb_indices is not None and not callable(loss_weight_by_fb_indices):
            raise TypeError("loss_weight_by_fb_indices must be a function of the (pairs, 2) index tensor")
        b, n = seq.shape
        forward, backward = self.belief_embeds(seq, lens)
        pairs = self._pairs(n, seq.device)
        f, s = pairs.unbind(-1)  # (p,)
        # a pair is labelled where its suffix starts inside the row (s <= len)
        valid = s[None, :] <= (lens[:, None] if lens is not None else n)  # (b, p)
        labels = torch.stack((seq[:, f + 1], seq[:, s - 1]), dim=1)  # (b, 2, p): next of prefix, previous of suffix
        labels = labels.masked_fill(~valid[:, None, :], -1)

        embeds = torch.cat((forward[:, f], backward[:, s]), dim=-1)  # (b, p, 2d)
        distance = (s - f).to(embeds.dtype)  # (p,)
        conditioned = self.cond_on_distance and self.training and random.random() < self.cond_on_distance_prob
        if conditioned:
            embeds = embeds * self.to_distance_cond(distance[:, None])  # (b, p, 2d)
        logits = self.text_head(embeds).unflatten(-1, (2, self.num_tokens))  # (b, p, 2, v)
        losses = F.cross_entropy(logits.permute(0, 3, 2, 1).float(), labels, ignore_index=-1, reduction="none")

        weights = self.loss_weights.view(1, 2, 1).expand(b, 2, pairs.shape[0])  # (b, 2, p)
        if loss_weight_by_fb_indices is not None:
            extra = loss_weight_by_fb_indices(pairs)
            if not isinstance(extra, Tensor) or extra.shape not in ((pairs.shape[0],), (pairs.shape[0], 2)):
                raise ValueError(f"loss_weight_by_fb_indices must return a ({pairs.shape[0]},) or "
                                 f"({pairs.shape[0]}, 2) tensor, got {tuple(getattr(extra, 'shape', ()))}")
            weights = weights * (extra[None, None, :] if extra.ndim == 1 else extra.t()[None])
        labelled = labels >= 0
        loss = (losses * weights).sum() / labelled.sum().clamp(min=1)

        if self.to_distance_logits is not None and not conditioned:
            target = (s - f).clamp(max=self.max_pred_distance - 1).expand(b, -1).masked_fill(~valid, -1)
            dist_logits = self.to_distance_logits(embeds)  # (b, p, max_pred_distance)
            dist_loss = F.cross_entropy(dist_logits.transpose(1, 2).float(), target, ignore_index=-1)
            loss = loss + dist_loss * self.pred_distance_loss_weight
        return loss

    # -- goal-conditioned generation -----------------------------------------------------------

    def _suffix_state(self, suffix: Tensor | None, batch: int, device) -> Tensor:
        """The backward state (b, 1, d) of the goal suffix (the empty suffix when None)."""
        start = self._suffix_tokens(batch)
        if suffix is None:  # causal: the suffix token's own state ignores the token after it
            dummy = torch.zeros(batch, 1, dtype=torch.long, device=device)
            return self.backward_decoder(dummy, prepend_embeds=start, return_embeddings=True)[:, :1]
        if suffix.ndim == 1:
            suffix = suffix.expand(batch, -1)
        if suffix.ndim != 2 or suffix.shape[0] != batch or suffix.shape[1] == 0:
            raise ValueError(f"suffix must be (n,) or ({batch}, n) token ids with n >= 1, got {tuple(suffix.shape)}")
        return self.backward_decoder(suffix.flip(1), prepend_embeds=start, return_embeddings=True)[:, -1:]

    @torch.no_grad()
    def generate_with_suffix_cond(self, prompts: Tensor, seq_len: int, temperature: float = 1.25,
                                  cache_kv: bool = False, suffix: Tensor | None = None,
                                  filter_logits_fn=min_p, filter_kwargs: dict | None = None,
                                  decode_backwards: bool = False) -> Tensor:
        """``seq_len`` tokens after ``prompts`` ((b, n) or (n,)), each drawn from the text head's
        next-token logits given the prefix so far and the goal ``suffix`` ((b, m) or (m,); None:
        the empty suffix). ``decode_backwards``: the backward decoder extends the reversed prompt
        (previous-token logits; the forward state is that of a random token, as upstream; no cache).
        ``cache_kv``: the forward decoder decodes with a key/value cache. Returns
        the new tokens, (b, seq_len) or (seq_len,)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        check_prompts(prompts, self.num_tokens)  # (latent_prefix.py: the latent wrappers' one check)
        filter_kwargs = dict(min_p=0.1) if filter_kwargs is None else filter_kwargs
        if temperature != 0:
            check_filter_kwargs(filter_logits_fn, filter_kwargs)
        if suffix is not None and decode_backwards:
            raise ValueError("suffix conditions forward decoding; decode_backwards reads no suffix")
        was_training = self.training
        self.eval()
        try:
            return self._generate(prompts, seq_len, temperature, cache_kv, suffix, filter_logits_fn, filter_kwargs,
                                  decode_backwards)
        finally:
            self.train(was_training)

    def _generate(self, prompts, seq_len, temperature, cache_kv, suffix, filter_fn, filter_kwargs, backwards):
        one = prompts.ndim == 1
        out = prompts[None] if one else prompts
        b, start, device = out.shape[0], out.shape[1], out.device
        decoder = self.backward_decoder if backwards else self.forward_decoder
        if backwards:
            out = out.flip(1)
            other = self.forward_decoder(torch.randint(0, self.num_tokens, (b, 1), device=device),
                                         return_embeddings=True)  # (b, 1, d)
        else:
            other = self._suffix_state(suffix, b, device)
        # (the backward decoder reads the suffix token as a prepended embedding, which our wrapper
        # takes only without a cache: backward decoding recomputes)
        cache = KVCache() if cache_kv and not backwards else None
        step = out
        for _ in range(seq_len):
            extra = dict(prepend_embeds=self._suffix_tokens(b)) if backwards else {}
            state = decoder(step, cache=cache, return_embeddings=True, **extra)[:, -1:]  # (b, 1, d)
            pair = torch.cat((other, state) if backwards else (state, other), dim=-1)
            logits = self.text_head(pair)[:, -1].unflatten(-1, (2, self.num_tokens))[:, int(backwards)]  # (b, v)
            token = sample(logits, temperature=temperature, filter_logits_fn=filter_fn, filter_kwargs=filter_kwargs)
            out = torch.cat((out, token[:, None]), dim=1)
            step = out if cache is None else token[:, None]
        new = out[:, start:]
        return new[0] if one else new
