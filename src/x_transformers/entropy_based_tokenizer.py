"""Entropy patching (Byte Latent Transformer, Pagnoni et al. 2024, arXiv 2412.09871): a small
causal model reads the sequence, and a segment (a "patch", a variable-length token) ends at every
position where the model's next-token entropy reaches ``entropy_threshold`` -- the next element is
hard to predict, so a new patch starts there. Predictable runs become long patches.

``EntropyBasedTokenizer`` keeps upstream x-transformers' names and return conventions: the patch
lengths (b, num_patches), zero padded, or the sequence cut into its patches.

Legend: b batch, n sequence length, v vocabulary, t patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from .hub import Pretrained


def entropies_from_logits(logits: Tensor) -> Tensor:
    """(..., v) logits -> (...) entropy of the softmax, in nats, computed in float32."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).nan_to_num().sum(dim=-1)


def accumulated_boundaries(entropies: Tensor, threshold: float) -> Tensor:
    """(b, n) -> (b, n) bool: a patch ends where the entropies summed since the patch began reach
    ``threshold`` (the sum restarts after each end). Sequential over n, vectorised over b."""
    acc = torch.zeros(entropies.shape[0], dtype=torch.float64, device=entropies.device)
    ends = torch.zeros(entropies.shape, dtype=torch.bool, device=entropies.device)
    for i in range(entropies.shape[1]):
        acc = acc + entropies[:, i].double()
        ends[:, i] = acc >= threshold
        acc = acc.masked_fill(ends[:, i], 0.0)
    return ends


def split_long_patches(ends: Tensor, max_size: int) -> Tensor:
    """(b, n) patch ends -> the same with every patch longer than ``max_size`` cut into pieces
    of ``max_size`` (the last piece the remainder)."""
    n = ends.shape[1]
    idx = torch.arange(n, device=ends.device).expand_as(ends)
    # each position's patch start: one past the previous end (0 for the first patch)
    starts = torch.where(F.pad(ends[:, :-1], (1, 0), value=True), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return ends | ((idx - starts + 1) % max_size == 0)


class EntropyBasedTokenizer(Pretrained, nn.Module):
    """Cuts token sequences into patches by a small decoder's next-token entropy (2412.09871).

    ``decoder``: a causal model mapping ids (b, n) to logits (b, n, v) (e.g. a ``TransformerWrapper``
    over a ``Decoder``). A patch ends at position i when the entropy of the decoder's prediction at
    i (of element i + 1) is at least ``entropy_threshold``, so element i + 1 starts a new patch.
    ``accumulate_entropy``: instead, a patch ends once the entropies summed over it reach the
    threshold; entropies below ``ignore_entropy_below`` then count as zero (equal to the threshold,
    this is the plain rule again). ``max_token_size``: no patch is longer (longer ones are cut)."""

    def __init__(self, decoder: nn.Module, entropy_threshold: float, accumulate_entropy: bool = False,
                 ignore_entropy_below: float = 0.0, max_token_size: int | None = None):
        super().__init__()
        if not isinstance(decoder, nn.Module):
            raise TypeError(f"decoder must be a module mapping token ids (b, n) to logits (b, n, v), "
                            f"got {type(decoder).__name__}")
        if getattr(getattr(decoder, "attn_layers", None), "causal", True) is False:
            raise ValueError("decoder must be causal (a Decoder): a bidirectional model sees the element whose "
                             "predictability the entropy is meant to measure")
        for name, value in (("entropy_threshold", entropy_threshold), ("ignore_entropy_below", ignore_entropy_below)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number (nats), got {value!r}")
        if not isinstance(accumulate_entropy, bool):
            raise ValueError(f"accumulate_entropy must be True or False, got {accumulate_entropy!r}")
        if ignore_entropy_below > entropy_threshold:
            raise ValueError(f"ignore_entropy_below ({ignore_entropy_below}) must not exceed entropy_threshold "
                             f"({entropy_threshold})")
        if max_token_size is not None and (isinstance(max_token_size, bool) or not isinstance(max_token_size, int)
                                           or max_token_size < 1):
            raise ValueError(f"max_token_size must be a positive integer or None, got {max_token_size!r}")
        self.decoder = decoder
        self.entropy_threshold = float(entropy_threshold)
        self.accumulate_entropy = accumulate_entropy
        self.ignore_entropy_below = float(ignore_entropy_below)
        self.max_token_size = max_token_size

    def _check(self, seq, lens):
        if not isinstance(seq, Tensor) or seq.is_floating_point() or seq.dtype == torch.bool or seq.ndim not in (1, 2):
            raise ValueError(f"seq must be integer token ids of shape (n,) or (b, n), got "
                             f"{getattr(seq, 'dtype', type(seq).__name__)} {tuple(getattr(seq, 'shape', ()))}")
        if seq.shape[-1] == 0 or (seq.ndim == 2 and seq.shape[0] == 0):
            raise ValueError(f"seq is empty: shape {tuple(seq.shape)}")
        if lens is None:
            return
        b, n = (1, seq.shape[0]) if seq.ndim == 1 else seq.shape
        if not isinstance(lens, Tensor) or lens.is_floating_point() or lens.dtype == torch.bool or lens.shape != (b,):
            raise ValueError(f"lens must be an integer tensor of shape ({b},), got "
                             f"{getattr(lens, 'dtype', type(lens).__name__)} {tuple(getattr(lens, 'shape', ()))}")
        if ((lens < 1) | (lens > n)).any():
            raise ValueError(f"lens must lie in [1, {n}] (the sequence length), got {lens.tolist()}")

    def entropies(self, seq: Tensor, decoder_forward_kwargs: dict | None = None) -> Tensor:
        """(b, n) ids -> (b, n): entropy (nats) of the decoder's prediction at each position."""
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            logits = self.decoder(seq, **(decoder_forward_kwargs or {}))
        finally:
            self.decoder.train(was_training)
        if not isinstance(logits, Tensor) or logits.shape[:2] != seq.shape or logits.ndim != 3:
            raise ValueError(f"decoder must return logits (b, n, v) for ids {tuple(seq.shape)}, got "
                             f"{tuple(getattr(logits, 'shape', ())) or type(logits).__name__}")
        return entropies_from_logits(logits)

    def boundaries(self, seq: Tensor, lens: Tensor | None = None, decoder_forward_kwargs: dict | None = None) -> Tensor:
        """(b, n) ids -> (b, n) bool: True at the last element of each patch (False past ``lens``)."""
        b, n = seq.shape
        entropies = self.entropies(seq, decoder_forward_kwargs)
        if self.accumulate_entropy:
            kept = entropies.masked_fill(entropies < self.ignore_entropy_below, 0.0)
            ends = accumulated_boundaries(kept, self.entropy_threshold)
        else:
            ends = entropies >= self.entropy_threshold
        within = torch.ones_like(ends) if lens is None else \
            torch.arange(n, device=seq.device)[None] < lens.to(seq.device)[:, None]
        last = n - 1 if lens is None else lens.to(seq.device) - 1
        ends = ends & within
        ends[torch.arange(b, device=seq.device), last] = True  # the sequence's last element ends a patch
        if self.max_token_size is not None:
            ends = split_long_patches(ends, self.max_token_size) & within
        return ends

    @torch.no_grad()
    def forward(self, seq: Tensor, lens: Tensor | None = None, return_segmented_seq: bool = False,
                decoder_forward_kwargs: dict | None = None):
        """seq (b, n) or (n,) ids, ``lens`` (b,) the kept length of each (right-padded) row.

        Returns the patch lengths (b, t) (rows zero-padded; (t,) for an unbatched seq), which sum to
        each row's length; with ``return_segmented_seq`` the patches themselves: per row a tuple of
        1-D tensors (one tuple for an unbatched seq). ``decoder_forward_kwargs`` go to the decoder."""
        self._check(seq, lens)
        unbatched = seq.ndim == 1
        rows = seq[None] if unbatched else seq
        ends = self.boundaries(rows, lens, decoder_forward_kwargs)
        lengths = []
        for row_ends in ends:
            stops = row_ends.nonzero().squeeze(-1) + 1  # one past each patch's last element
            lengths.append(stops.diff(prepend=stops.new_zeros(1)))
        lengths = pad_sequence(lengths, batch_first=True)  # (b, t)
        if not return_segmented_seq:
            return lengths[0] if unbatched else lengths
        patches = []
        for row, row_lengths in zip(rows, lengths):
            row_lengths = row_lengths[row_lengths > 0]
            patches.append(row[:int(row_lengths.sum())].split(row_lengths.tolist()))
        return patches[0] if unbatched else patches


__all__ = ["EntropyBasedTokenizer", "entropies_from_logits"]
