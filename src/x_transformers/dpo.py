"""Direct Preference Optimization (Rafailov et al., 2305.18290): a policy trained on preference
pairs against a frozen copy of itself, no reward model.

``DPO(model)`` keeps ``model`` as the policy and a frozen deep copy as the reference. For a
prompt with a preferred and an unpreferred completion (both as full sequences, prompt first),

    loss = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))))

where log pi(y) sums the next-token log-probabilities of the completion's tokens: those that
are neither prompt (``prompt_mask``) nor padding (``pad_id`` or the ``*_seq_mask``).
``reduction="mean"`` averages them per sequence instead (upstream's choice).

Legend: b batch, n tokens, v vocabulary.
"""

from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hub import Pretrained
from .wrappers import TransformerWrapper

REDUCTIONS = ("sum", "mean")


def sequence_log_probs(model: nn.Module, seq: Tensor, mask: Tensor | None = None) -> Tensor:
    """(b, n) -> (b, n - 1): log p(seq[:, t] | seq[:, :t]) for t = 1..n-1. ``mask`` (b, n), True
    = a real token, is the model's key mask (so left padding moves no position)."""
    logits = model(seq[:, :-1], mask[:, :-1] if mask is not None else None)
    logp = logits.float().log_softmax(dim=-1)
    return logp.gather(-1, seq[:, 1:, None]).squeeze(-1)


def reduce_log_probs(logp: Tensor, keep: Tensor, reduction: str = "sum") -> Tensor:
    """(b, n - 1) token log-probs, (b, n - 1) bool -> (b,): their sum (or mean) over kept tokens."""
    total = logp.masked_fill(~keep, 0.0).sum(dim=-1)
    if reduction == "mean":
        total = total / keep.sum(dim=-1).clamp(min=1)
    return total


def dpo_loss(policy_preferred: Tensor, policy_unpreferred: Tensor, ref_preferred: Tensor, ref_unpreferred: Tensor,
             beta: float) -> Tensor:
    """The paper's loss (eq. 7) from the four (b,) sequence log-probabilities, averaged over the batch."""
    margin = (policy_preferred - ref_preferred) - (policy_unpreferred - ref_unpreferred)
    return -F.logsigmoid(beta * margin).mean()


class DPO(Pretrained, nn.Module):
    """Wraps a causal :class:`TransformerWrapper`: ``forward(preferred_seq, unpreferred_seq,
    prompt_mask=...)`` is the DPO loss. ``parameters()`` yields only the policy's (the reference
    is frozen, in eval mode, and never changes); ``policy_model`` is the one trained."""

    def __init__(self, model: TransformerWrapper, *, beta: float = 0.1, pad_id: int | None = None,
                 reduction: str = "sum"):
        super().__init__()
        if not isinstance(model, TransformerWrapper):
            raise TypeError(f"model must be a TransformerWrapper, got {type(model).__name__}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta must be a number > 0, got {beta!r}")
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise ValueError(f"pad_id must be a token id or None, got {pad_id!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.policy_model = model
        self.ref_model = deepcopy(model).eval()
        self.ref_model.requires_grad_(False)
        self.beta, self.pad_id, self.reduction = float(beta), pad_id, reduction

    def parameters(self, recurse: bool = True):
        return self.policy_model.parameters(recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.ref_model.eval()  # the reference is a fixed function: no dropout, ever
        return self

    def _seq_mask(self, seq: Tensor, given: Tensor | None, name: str) -> Tensor | None:
        if given is not None:
            if given.dtype != torch.bool or given.shape != seq.shape:
                raise ValueError(f"{name} must be a bool tensor of shape {tuple(seq.shape)}, True = real token; "
                                 f"got {given.dtype} of shape {tuple(given.shape)}")
            return given
        return seq != self.pad_id if self.pad_id is not None else None

    def forward(self, preferred_seq: Tensor, unpreferred_seq: Tensor, *, prompt_mask: Tensor,
                preferred_seq_mask: Tensor | None = None, unpreferred_seq_mask: Tensor | None = None) -> Tensor:
        """preferred_seq / unpreferred_seq (b, n) token ids, each prompt then completion (padded
        to n); prompt_mask (b, n) bool, True at prompt tokens (shared by both). The masks (b, n)
        mark real tokens; by default those other than ``pad_id``. -> the scalar loss."""
        for name, seq in (("preferred_seq", preferred_seq), ("unpreferred_seq", unpreferred_seq)):
            if seq.ndim != 2 or seq.shape[1] < 2:
                raise ValueError(f"{name} must be (batch, seq >= 2) token ids, got {tuple(seq.shape)}")
        if preferred_seq.shape[0] != unpreferred_seq.shape[0]:
            raise ValueError(f"preferred_seq and unpreferred_seq must have the same batch, got "
                             f"{preferred_seq.shape[0]} and {unpreferred_seq.shape[0]}")
        if preferred_seq.shape != unpreferred_seq.shape:
            raise ValueError(f"preferred_seq and unpreferred_seq must have the same shape (pad to one length), got "
                             f"{tuple(preferred_seq.shape)} and {tuple(unpreferred_seq.shape)}")
        if not isinstance(prompt_mask, Tensor) or prompt_mask.dtype != torch.bool \
                or prompt_mask.shape != preferred_seq.shape:
            raise ValueError(f"prompt_mask must be a bool tensor of shape {tuple(preferred_seq.shape)}, True at "
                             f"prompt tokens; got {prompt_mask!r}" if not isinstance(prompt_mask, Tensor) else
                             f"prompt_mask must be a bool tensor of shape {tuple(preferred_seq.shape)}, True at "
                             f"prompt tokens; got {prompt_mask.dtype} of shape {tuple(prompt_mask.shape)}")
        logps = []
        for seq, given, name in ((preferred_seq, preferred_seq_mask, "preferred_seq_mask"),
                                 (unpreferred_seq, unpreferred_seq_mask, "unpreferred_seq_mask")):
            mask = self._seq_mask(seq, given, name)
            keep = ~prompt_mask if mask is None else mask & ~prompt_mask
            keep = keep[:, 1:]  # the log-prob of token t counts when token t is a completion token
            with torch.no_grad():
                ref = sequence_log_probs(self.ref_model, seq, mask)
            policy = sequence_log_probs(self.policy_model, seq, mask)
            logps.append((reduce_log_probs(policy, keep, self.reduction), reduce_log_probs(ref, keep, self.reduction)))
        (pw, rw), (pl, rl) = logps
        return dpo_loss(pw, pl, rw, rl, self.beta)


__all__ = ["DPO", "dpo_loss", "sequence_log_probs", "reduce_log_probs"]
