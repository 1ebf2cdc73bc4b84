"""``XMLatentDecoder``: a decoder conditioned on latent tokens trained by winner-takes-all over
random latent candidates (upstream x-transformers' ``xm_latent_decoder``): the forward variant of
Explorative Modeling (Gladstone et al., arXiv 2607.27372), in the line of Discrete Distribution
Networks (Lei Yang, arXiv 2401.00036).

``num_latents`` latent vectors are put ahead of a causal ``TransformerWrapper``'s tokens. Each
training step picks one latent slot (the active one) and draws ``candidates`` values of it from
N(0, I), the other slots shared by all candidates; every candidate is scored by its next-token loss
and only the best one per row (``winner_fn``) is trained. So each region of latent space comes to
stand for one way the data can go, with no encoder. An optional repulsive term (the mean KL of each
candidate's prediction from the candidates' mixture, a generalised Jensen-Shannon divergence)
pushes candidates apart.

Legend: b batch, k candidates, L latent slots, l latent dim, d the net's embedding dim, n
sequence length, v vocabulary.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import _positive_int
from .latent_prefix import check_number, check_prompts, generate_with_prefix
from .wrappers import TransformerWrapper


def lowest_loss_winner_fn(losses: Tensor, intermediates=None) -> Tensor:
    """(b, k) candidate losses -> (b,) index of the lowest (the default winner)."""
    return losses.argmin(dim=-1)


def _takes_two(fn) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _winner(scores_or_index: Tensor, b: int, k: int, name: str) -> Tensor:
    """A winner fn's result -> (b,) indices: (b,) indices as they are, (b, k) scores by argmax."""
    out = scores_or_index
    if isinstance(out, Tensor) and out.shape == (b, k):
        out = out.argmax(dim=-1)
    if not isinstance(out, Tensor) or out.shape != (b,) or out.is_floating_point() or \
            ((out < 0) | (out >= k)).any():
        raise ValueError(f"{name} must return candidate indices (b={b},) in [0, {k}) or scores (b, k), got "
                         f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}")
    return out


class XMLatentDecoder(nn.Module):
    """A causal ``TransformerWrapper`` read after ``num_latents`` latent tokens, trained by
    winner-takes-all over ``candidates`` random draws of one latent (see the module docstring).

    ``dim``: the width of the latent tokens fed to the net (its embedding width, the default);
    ``latent_dim`` (default ``dim``): the latents' own width, projected to ``dim`` (also when
    ``always_latent_proj``). ``max_batch_size``: candidates run in chunks of at most that many rows.
    ``latent_drop_prob``: the chance a training step runs without latents. ``winner_fn`` (one for
    every slot) or ``winner_fns`` (one per slot): (losses (b, k)[, intermediates with ``.logits``
    (b, k, n, v)]) -> indices (b,) or scores (b, k) (highest wins)."""

    def __init__(self, net: TransformerWrapper, num_latents: int = 4, dim: int | None = None,
                 latent_dim: int | None = None, candidates: int = 2, max_batch_size: int | None = None,
                 ignore_index: int = -100, latent_drop_prob: float = 0.0, always_latent_proj: bool = False,
                 repulsive_loss_weight: float = 0.0, winner_fn: Callable | Sequence[Callable] = lowest_loss_winner_fn,
                 winner_fns: Sequence[Callable] | None = None):
        super().__init__()
        if not isinstance(net, TransformerWrapper):
            raise TypeError(f"net must be a TransformerWrapper (a Decoder's), got {type(net).__name__}")
        if not getattr(net.attn_layers, "causal", False):
            raise ValueError("net must be causal (a Decoder): the candidates are scored by next-token losses")
        if net.cfg.return_only_embed:
            raise ValueError("net must have an output head (return_only_embed=False): candidates are scored by logits")
        for name, value in (("num_latents", num_latents), ("candidates", candidates)):
            _positive_int(name, value)
        for name, value in (("dim", dim), ("latent_dim", latent_dim), ("max_batch_size", max_batch_size)):
            _positive_int(name, value, allow_none=True)
        if dim is not None and dim != net.emb_dim:
            raise ValueError(f"dim ({dim}) must be the net's embedding width ({net.emb_dim}): the latent tokens are "
                             f"put ahead of its token embeddings; set latent_dim for the latents' own width")
        check_number("latent_drop_prob", latent_drop_prob, 0.0, 1.0)
        check_number("repulsive_loss_weight", repulsive_loss_weight)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}")
        self.net = net
        self.num_latents, self.candidates, self.max_batch_size = num_latents, candidates, max_batch_size
        self.dim = net.emb_dim
        self.latent_dim = latent_dim or self.dim
        self.ignore_index = ignore_index
        self.latent_drop_prob = float(latent_drop_prob)
        self.repulsive_loss_weight = float(repulsive_loss_weight)
        proj = self.latent_dim != self.dim or always_latent_proj
        self.latent_proj = nn.Linear(self.latent_dim, self.dim) if proj else nn.Identity()
        self.winner_fns = self._winner_fns(winner_fn, winner_fns, "winner_fn")

    def _winner_fns(self, winner_fn, winner_fns, name) -> tuple:
        fns = winner_fns if winner_fns is not None else winner_fn
        fns = tuple(fns) if isinstance(fns, (tuple, list)) else (fns,) * self.num_latents
        if len(fns) != self.num_latents or not all(callable(f) for f in fns):
            raise ValueError(f"{name}: one callable, or one per latent slot ({self.num_latents}), got {fns!r}")
        return fns

    @property
    def max_seq_len(self):
        return self.net.max_seq_len

    def init_latents(self, latents, batch: int, device=None) -> Tensor:
        """None -> random (b, L, l); a list of L entries, each (b, l) or None (drawn) -> (b, L, l);
        a tensor (b, L, l) or (b, k, L, l) as it is (checked)."""
        if latents is None:
            return torch.randn(batch, self.num_latents, self.latent_dim, device=device)
        if isinstance(latents, (tuple, list)):
            if len(latents) != self.num_latents:
                raise ValueError(f"latents: a list needs one entry per slot ({self.num_latents}), got {len(latents)}")
            ref = next((t for t in latents if t is not None), None)
            like = dict(device=device if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
            latents = torch.stack([torch.randn(batch, self.latent_dim, **like) if t is None else t for t in latents], 1)
        ok = isinstance(latents, Tensor) and latents.ndim in (3, 4) and latents.shape[0] == batch \
            and latents.shape[-2:] == (self.num_latents, self.latent_dim)
        if not ok:
            raise ValueError(f"latents must be (b={batch}, {self.num_latents}, {self.latent_dim}) or (b, k, "
                             f"{self.num_latents}, {self.latent_dim}), got "
                             f"{tuple(getattr(latents, 'shape', ())) or type(latents).__name__}")
        return latents

    def _candidate_latents(self, latents, b, k, active, device) -> Tensor:
        """(b, k, L, l): the active slot drawn afresh per candidate, the others shared."""
        latents = self.init_latents(latents, b, device)
        if latents.ndim == 4:
            if latents.shape[1] != k:
                raise ValueError(f"latents (b, k, L, l) hold {latents.shape[1]} candidates but candidates={k}")
            return latents
        latents = latents[:, None].expand(-1, k, -1, -1).clone()
        latents[:, :, active] = torch.randn(b, k, self.latent_dim, device=latents.device, dtype=latents.dtype)
        return latents

    def _logits(self, seq, mask, prefix, chunk, kwargs) -> Tensor:
        """Rows of (ids, mask, prefix) in chunks of ``chunk`` -> logits (rows, n, v)."""
        out = []
        for i in range(0, seq.shape[0], chunk):
            part = slice(i, i + chunk)
            out.append(self.net(seq[part], None if mask is None else mask[part], prepend_embeds=prefix[part],
                                excise_prepend_embeds=True, **kwargs))
        return torch.cat(out)

    def forward(self, seq: Tensor, latents=None, candidates: int | None = None, max_batch_size: int | None = None,
                latent_drop_prob: float | None = None, return_loss: bool = True,
                repulsive_loss_weight: float | None = None, mask: Tensor | None = None, winner_fn=None,
                winner_fns=None, active_latent_index: int | None = None, **kwargs):
        """seq (b, n) -> the winners' mean next-token loss (less the repulsive term). With
        ``return_loss=False``: (logits (b, k, n, v), the candidates' latents (b, k, L, l)) for seq as
        given. ``mask`` (b, n): kept tokens. Other keywords go to the net."""
        k = self.candidates if candidates is None else candidates
        _positive_int("candidates", k)
        chunk = max_batch_size or self.max_batch_size
        _positive_int("max_batch_size", chunk, allow_none=True)
        drop = self.latent_drop_prob if latent_drop_prob is None else latent_drop_prob
        check_number("latent_drop_prob", drop, 0.0, 1.0)
        repulse = self.repulsive_loss_weight if repulsive_loss_weight is None else repulsive_loss_weight
        fns = self.winner_fns if winner_fn is None and winner_fns is None else \
            self._winner_fns(winner_fn, winner_fns, "winner_fn")
        if not isinstance(seq, Tensor) or seq.ndim != 2:
            raise ValueError(f"seq must be token ids (b, n), got {tuple(getattr(seq, 'shape', ())) or type(seq).__name__}")
        check_prompts(seq.masked_fill(seq == self.ignore_index, 0), self.net.num_tokens, "seq")
        if return_loss and seq.shape[1] < 2:
            raise ValueError(f"seq must hold at least 2 tokens per row for a next-token loss, got {seq.shape[1]}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != seq.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(seq.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        active = int(torch.randint(self.num_latents, ())) if active_latent_index is None else active_latent_index
        if isinstance(active, bool) or not isinstance(active, int) or not 0 <= active < self.num_latents:
            raise ValueError(f"active_latent_index must be in [0, {self.num_latents}), got {active_latent_index!r}")
        b, device = seq.shape[0], seq.device
        inp, in_mask = (seq[:, :-1], None if mask is None else mask[:, :-1]) if return_loss else (seq, mask)
        inp = inp.masked_fill(inp == self.ignore_index, 0)  # ignored positions are fed as id 0
        if return_loss:
            labels = seq[:, 1:]
            keep = labels != self.ignore_index
            keep = keep if mask is None else keep & mask[:, 1:]

        if self.training and drop > 0 and float(torch.rand(())) < drop:  # this step without latents
            logits = self.net(inp, in_mask, **kwargs)
            if not return_loss:
                return logits
            return self._row_losses(logits, labels, keep).mean()

        lat = self._candidate_latents(latents, b, k, active, device)  # (b, k, L, l)
        prefix = self.latent_proj(lat.flatten(0, 1))  # (b*k, L, d)
        rep = lambda t: None if t is None else t.repeat_interleave(k, dim=0)  # noqa: E731  (b, ...) -> (b*k, ...)
        logits = self._logits(rep(inp), rep(in_mask), prefix, chunk or b * k, kwargs)  # (b*k, n, v)
        if not return_loss:
            return logits.unflatten(0, (b, k)), lat
        losses = self._row_losses(logits, rep(labels), rep(keep)).view(b, k)
        fn = fns[active]
        candidate_logits = logits.unflatten(0, (b, k))
        if fn is not lowest_loss_winner_fn and _takes_two(fn):
            chosen = fn(losses, SimpleNamespace(logits=candidate_logits))
        else:
            chosen = fn(losses)
        winner = _winner(chosen, b, k, "winner_fn")
        loss = losses.gather(1, winner[:, None]).mean()
        if repulse == 0 or k == 1:
            return loss
        return loss - repulse * self._repulsion(candidate_logits, keep)

    def _row_losses(self, logits, labels, keep) -> Tensor:
        """(r, n, v), (r, n), (r, n) -> (r,) mean cross-entropy over each row's kept positions."""
        ce = F.cross_entropy(logits.transpose(1, 2), labels.masked_fill(~keep, 0), reduction="none")  # (r, n)
        w = keep.to(ce.dtype)
        return (ce * w).sum(-1) / w.sum(-1).clamp(min=1)

    @staticmethod
    def _repulsion(candidate_logits, keep) -> Tensor:
        """Mean over candidates of KL(p_k || mean of the p's), averaged over kept positions."""
        logp = candidate_logits.float().log_softmax(dim=-1)  # (b, k, n, v)
        log_mix = logp.logsumexp(dim=1, keepdim=True) - math.log(logp.shape[1])
        kl = (logp.exp() * (logp - log_mix)).sum(-1).mean(dim=1)  # (b, n)
        w = keep.to(kl.dtype)
        return (kl * w).sum() / w.sum().clamp(min=1)

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, seq_len: int, latents=None, **kwargs) -> Tensor:
        """``seq_len`` tokens after ``start_tokens`` (b, n), read after the latents ((b, L, l), a list
        per slot, or None: drawn at random). Keywords: those of ``AutoregressiveWrapper.generate``."""
        rows, unbatched = check_prompts(start_tokens, self.net.num_tokens, "start_tokens")
        lat = self.init_latents(latents, rows.shape[0], rows.device)
        if lat.ndim != 3:
            raise ValueError(f"latents for generate must be (b, {self.num_latents}, {self.latent_dim}), "
                             f"got {tuple(lat.shape)}")
        out = generate_with_prefix(self.net, rows, seq_len, self.latent_proj(lat), where="XMLatentDecoder.generate",
                                   **kwargs)
        return out[0] if unbatched else out

    @torch.no_grad()
    def generate_with_candidate_latents(self, start_tokens: Tensor, seq_len: int, winner_fn=None, winner_fns=None,
                                        candidates: int | None = None, latents=None,
                                        active_latent_index: int | None = None, return_best_latents: bool = False,
                                        **kwargs):
        """Pick latents for the prompt, then generate with them. For the active slot (slot 0, or
        ``active_latent_index``; every slot in turn when ``winner_fns`` is a sequence) ``candidates``
        values are drawn and the winner kept: by default the one under which the prompt itself is
        most likely (lowest next-token loss); a ``winner_fn`` of your own gets the candidates' logits
        over the prompt (b, k, n, v) and returns indices (b,) or scores (b, k).

        Returns the tokens (b, seq_len); with ``return_best_latents`` also (the last sweep's candidate
        latents (b, k, L, l), the winners (b,), or (b, slots) for a sweep)."""
        rows, unbatched = check_prompts(start_tokens, self.net.num_tokens, "start_tokens")
        sweep = isinstance(winner_fns if winner_fns is not None else winner_fn, (tuple, list))
        fns = self.winner_fns if winner_fn is None and winner_fns is None else \
            self._winner_fns(winner_fn, winner_fns, "winner_fn")
        if active_latent_index is not None:
            slots = [active_latent_index]
        else:
            slots = range(self.num_latents) if sweep else [0]
        k = self.candidates if candidates is None else candidates
        b = rows.shape[0]
        lat = self.init_latents(latents, b, rows.device)
        was_training = self.training
        self.eval()
        try:
            winners = []
            for slot in slots:
                fn = fns[slot]
                if fn is lowest_loss_winner_fn:  # how well each candidate explains the prompt
                    if rows.shape[1] < 2:
                        raise ValueError("start_tokens: the default winner scores candidates by the prompt's own "
                                         "next-token loss, which needs at least 2 tokens; pass a winner_fn")
                    cand_logits, cand = self(rows, latents=lat, candidates=k, active_latent_index=slot,
                                             return_loss=False)
                    keep = torch.ones_like(rows[:, 1:], dtype=torch.bool).repeat_interleave(k, dim=0)
                    losses = self._row_losses(cand_logits.flatten(0, 1)[:, :-1], rows[:, 1:].repeat_interleave(k, 0),
                                              keep).view(b, k)
                    winner = _winner(fn(losses), b, k, "winner_fn")
                else:
                    cand_logits, cand = self(rows, latents=lat, candidates=k, active_latent_index=slot,
                                             return_loss=False)
                    winner = _winner(fn(cand_logits), b, k, "winner_fn")
                winners.append(winner)
                lat = cand[torch.arange(b, device=rows.device), winner]  # (b, L, l)
        finally:
            self.train(was_training)
        out = self.generate(rows, seq_len, latents=lat, **kwargs)
        out = out[0] if unbatched else out
        if not return_best_latents:
            return out
        return out, (cand, winners[0] if len(winners) == 1 else torch.stack(winners, dim=-1))


__all__ = ["XMLatentDecoder", "lowest_loss_winner_fn"]
