"""DISCOVER (McCoy et al., "The Emergent Symbolic Structure of Artificial Neural Networks", arXiv
2608.29530), at upstream's module path: does a network's encoding of a sequence decompose as a
tensor product representation (TPR), a sum over positions of filler (token) x role bindings?

- :func:`role_ids_for_tokens`: the role of every position under a role scheme (left-to-right and
  right-to-left index, bidirectional: the pair of both, Wickelroles: the neighbours, bag of words:
  one role).
- :class:`TPREncoder`: state = sum_i B(filler_i, role_i) + bias, with B(f, r)_o = sum_{j,k}
  W[o, j, k] F[f, j] R[r, k]; fitted (:meth:`TPREncoder.fit`) to a network's encodings by MSE; a
  linear readout (default) makes the scheme's fit a test of structure, an MLP one of expressibility.
- :class:`DiscoverDecoder`: a causal ``TransformerWrapper`` as a sequence autoencoder: the input's
  hidden state at one position is the encoding, and the same decoder, given that encoding as a
  prepended embedding, reproduces a target sequence; :meth:`DiscoverDecoder.surgery` edits an
  encoding by the TPR's difference between an edited and the original sequence, then decodes.

Legend: b batch, n positions, o encoding width (dim), j filler width, k role width.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .wrappers import TransformerWrapper

ROLE_SCHEMES = ("bidirectional", "right_to_left", "left_to_right", "wickel", "bag_of_words")


def _scheme(scheme: str):
    if scheme not in ROLE_SCHEMES:
        raise ValueError(f"unknown role scheme {scheme!r}; valid: {', '.join(ROLE_SCHEMES)}")


def num_roles_for_scheme(scheme: str, *, max_seq_len: int, num_fillers: int) -> int:
    """How many role ids a scheme uses for sequences of at most ``max_seq_len`` fillers."""
    _scheme(scheme)
    if scheme in ("left_to_right", "right_to_left"):
        return max_seq_len
    if scheme == "bidirectional":  # one id per (index from the left, index from the right) with sum < max_seq_len
        return max_seq_len * (max_seq_len + 1) // 2
    if scheme == "wickel":  # (previous, next) filler, the boundary as one more symbol
        return (num_fillers + 1) ** 2
    return 1


def role_ids_for_tokens(tokens: Tensor, lengths: Tensor, scheme: str, *, max_seq_len: int, num_fillers: int) -> Tensor:
    """tokens (b, n) filler ids, lengths (b,) -> role ids (b, n); 0 past each row's length."""
    _scheme(scheme)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be (b, n) and lengths (b,), got {tuple(tokens.shape)} and {tuple(lengths.shape)}")
    n = tokens.shape[1]
    left = torch.arange(n, device=tokens.device)[None]  # (1, n)
    lengths = lengths.to(tokens.device)[:, None]
    right = lengths - 1 - left
    if scheme == "left_to_right":
        roles = left.expand_as(tokens)
    elif scheme == "right_to_left":
        roles = right
    elif scheme == "bidirectional":  # Cantor's pairing of (left, right): distinct pairs get distinct ids
        total = left + right
        roles = total * (total + 1) // 2 + left
    elif scheme == "wickel":
        boundary = torch.full_like(tokens, num_fillers)
        before = torch.where(left == 0, boundary, tokens.roll(1, dims=1))
        after = torch.where(left == lengths - 1, boundary, tokens.roll(-1, dims=1))
        roles = before * (num_fillers + 1) + after
    else:
        roles = torch.zeros_like(tokens)
    return roles.masked_fill(left >= lengths, 0)


class TPREncoder(nn.Module):
    """A tensor product representation of sequences: fillers x roles -> a (b, dim) encoding."""

    def __init__(self, *, dim: int, num_fillers: int, num_roles: int, filler_dim: int = 24, role_dim: int = 24,
                 mlp_dim: int | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("num_fillers", num_fillers), ("num_roles", num_roles),
                            ("filler_dim", filler_dim), ("role_dim", role_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TPREncoder: {name} must be an integer >= 1, got {value!r}")
        if mlp_dim is not None and (isinstance(mlp_dim, bool) or not isinstance(mlp_dim, int) or mlp_dim < 1):
            raise ValueError(f"TPREncoder: mlp_dim must be an integer >= 1 or None, got {mlp_dim!r}")
        self.dim = dim
        self.filler_emb = nn.Embedding(num_fillers, filler_dim)
        self.role_emb = nn.Embedding(num_roles, role_dim)
        nn.init.normal_(self.filler_emb.weight, std=0.05)
        nn.init.normal_(self.role_emb.weight, std=0.05)
        self.binding = nn.Parameter(torch.zeros(dim, filler_dim, role_dim))  # W (o, j, k), upstream's init
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mlp = None if mlp_dim is None else nn.Sequential(nn.Linear(dim, mlp_dim), nn.SiLU(), nn.Linear(mlp_dim, dim))

    def _check(self, tokens: Tensor, role_ids: Tensor, mask: Tensor | None):
        if tokens.ndim != 2 or role_ids.shape != tokens.shape:
            raise ValueError(f"tokens and role_ids must be (b, n) of one shape, got {tuple(tokens.shape)} and "
                             f"{tuple(role_ids.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(tokens.shape)}")
        keep = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
        for name, ids, table in (("tokens", tokens, self.filler_emb), ("role_ids", role_ids, self.role_emb)):
            kept = ids[keep]
            if kept.numel() and (kept.min() < 0 or kept.max() >= table.num_embeddings):
                raise ValueError(f"{name} must be ids in [0, {table.num_embeddings}) where kept; mark padding with mask")

    def state(self, tokens: Tensor, role_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """The binding state (b, dim) before the readout: sum over kept positions of B(filler, role), plus bias."""
        self._check(tokens, role_ids, mask)
        if mask is not None:
            tokens, role_ids = tokens.masked_fill(~mask, 0), role_ids.masked_fill(~mask, 0)
        fillers = self.filler_emb(tokens)  # (b, n, j)
        roles = self.role_emb(role_ids)  # (b, n, k)
        if mask is not None:
            fillers = fillers * mask[..., None].to(fillers.dtype)
        return torch.einsum("ojk,bnj,bnk->bo", self.binding, fillers, roles) + self.bias

    def readout(self, state: Tensor) -> Tensor:
        """The binding state -> the target encoding space (identity without an MLP)."""
        return state if self.mlp is None else self.mlp(state)

    def forward(self, tokens: Tensor, role_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.readout(self.state(tokens, role_ids, mask))

    def fit(self, tokens: Tensor, role_ids: Tensor, target_encodings: Tensor, *, mask: Tensor | None = None,
            steps: int = 2000, batch_size: int = 1024, lr: float = 3e-3, ema_decay: float = 0.9,
            optim: Callable = torch.optim.Adam) -> float:
        """Fit to (detached) encodings (N, dim) by MSE over random minibatches; returns the running
        (exponential moving average) minibatch MSE, the diagnostic of how well the scheme fits."""
        N = tokens.shape[0]
        self._check(tokens, role_ids, mask)
        if target_encodings.shape != (N, self.dim):
            raise ValueError(f"target_encodings must be ({N}, {self.dim}), got {tuple(target_encodings.shape)}")
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        targets = target_encodings.detach()
        opt, running = optim(self.parameters(), lr=lr), 0.0
        for _ in range(steps):
            rows = torch.randint(0, N, (batch_size,), device=tokens.device)
            opt.zero_grad()
            loss = F.mse_loss(self(tokens[rows], role_ids[rows], None if mask is None else mask[rows]), targets[rows])
            loss.backward()
            opt.step()
            running = ema_decay * running + (1 - ema_decay) * loss.item()
        return running


class DiscoverDecoder(nn.Module):
    """A causal ``TransformerWrapper`` as the bottleneck autoencoder of DISCOVER: sequence -> one
    encoding (its hidden state at ``enc_pos``: 'last' kept position, or an index) -> sequence."""

    def __init__(self, *, decoder: TransformerWrapper, num_fillers: int, bos_id: int, pad_id: int, max_seq_len: int,
                 enc_pos: int | str = "last"):
        super().__init__()
        if not isinstance(decoder, TransformerWrapper) or not getattr(decoder.attn_layers, "causal", False):
            raise TypeError(f"decoder must be a TransformerWrapper over a Decoder, got {type(decoder).__name__}")
        if not (enc_pos == "last" or (isinstance(enc_pos, int) and not isinstance(enc_pos, bool) and enc_pos >= 0)):
            raise ValueError(f"enc_pos must be 'last' or a position >= 0, got {enc_pos!r}")
        for name, value in (("bos_id", bos_id), ("pad_id", pad_id)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < decoder.num_tokens:
                raise ValueError(f"{name} must be a token id in [0, {decoder.num_tokens}), got {value!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
        self.decoder, self.num_fillers, self.bos_id, self.pad_id = decoder, num_fillers, bos_id, pad_id
        self.max_seq_len, self.enc_pos = max_seq_len, enc_pos

    @property
    def dim(self) -> int:
        return self.decoder.attn_layers.dim

    def encode(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """tokens (b, n) (mask: right padding) -> encodings (b, dim): the final hidden state at ``enc_pos``."""
        if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(tokens.shape)}")
        b, n = tokens.shape
        if self.enc_pos != "last" and self.enc_pos >= n:
            raise ValueError(f"enc_pos={self.enc_pos} is past the sequence ({n} tokens)")
        _, inter = self.decoder(tokens, mask, return_intermediates=True)
        last = mask.sum(dim=-1) - 1 if mask is not None else torch.full((b,), n - 1, device=tokens.device)
        pos = last if self.enc_pos == "last" else torch.full((b,), self.enc_pos, device=tokens.device)
        return inter.last_hidden[torch.arange(b, device=tokens.device), pos.long()]

    def _prefix(self, encodings: Tensor) -> dict:
        ones = torch.ones(encodings.shape[0], 1, dtype=torch.bool, device=encodings.device)
        return dict(prepend_embeds=encodings[:, None].to(self.decoder.token_emb.weight.dtype), prepend_mask=ones)

    @torch.no_grad()
    def decode(self, encodings: Tensor, lengths: Tensor | None = None, *, eos_id: int | None = None,
               max_len: int | None = None) -> Tensor:
        """Greedy decoding from encodings (b, dim) (edited or not), each the prepended embedding
        ahead of ``bos_id``: exactly ``lengths`` (b,) tokens per row, or up to the first ``eos_id``
        (at most ``max_len``, default max_seq_len); the rest of each row is ``pad_id``."""
        if (lengths is None) == (eos_id is None):
            raise ValueError("decode: give lengths or eos_id (one of them)")
        if encodings.ndim != 2 or encodings.shape[1] != self.dim:
            raise ValueError(f"encodings must be (b, {self.dim}), got {tuple(encodings.shape)}")
        b, device = encodings.shape[0], encodings.device
        total = int(lengths.max()) if lengths is not None else (max_len or self.max_seq_len)
        if total > self.max_seq_len:
            raise ValueError(f"decode: {total} tokens exceed max_seq_len ({self.max_seq_len})")
        was_training = self.decoder.training
        self.decoder.eval()
        try:
            seq = torch.full((b, 1), self.bos_id, device=device)
            for _ in range(total):  # the whole prefix again each step (a prepended embedding does not cache here)
                token = self.decoder(seq, **self._prefix(encodings))[:, -1].argmax(dim=-1, keepdim=True)
                seq = torch.cat((seq, token), dim=1)
        finally:
            self.decoder.train(was_training)
        out = seq[:, 1:]
        if eos_id is not None:
            is_eos = out == eos_id
            lengths = torch.where(is_eos.any(dim=-1), is_eos.float().argmax(dim=-1) + 1,
                                  torch.full((b,), total, device=device))
        return out.masked_fill(torch.arange(total, device=device)[None] >= lengths.to(device)[:, None], self.pad_id)

    @torch.no_grad()
    def surgery(self, tokens: Tensor, edited_tokens: Tensor, role_ids_old: Tensor, role_ids_new: Tensor,
                tpr: TPREncoder) -> Tensor:
        """Constituent surgery: encode ``tokens`` (``pad_id`` = padding), add the TPR's
        readout(edited) - readout(original), decode as many tokens as each row holds. With a
        linear readout this is the paper's swap of role-filler bindings."""
        shapes = {tuple(t.shape) for t in (tokens, edited_tokens, role_ids_old, role_ids_new)}
        if len(shapes) != 1:
            raise ValueError(f"tokens, edited_tokens and both role ids must share one (b, n) shape, got {sorted(shapes)}")
        mask = tokens != self.pad_id
        if not torch.equal(mask, edited_tokens != self.pad_id):
            raise ValueError("surgery: edits must stay inside each sequence (padding where the original has it)")
        encodings = self.encode(tokens, mask)
        old = tpr.readout(tpr.state(tokens.masked_fill(~mask, 0), role_ids_old, mask))
        new = tpr.readout(tpr.state(edited_tokens.masked_fill(~mask, 0), role_ids_new, mask))
        return self.decode(encodings + new - old, lengths=mask.sum(dim=-1))

    def forward(self, tokens: Tensor, targets: Tensor | None = None) -> Tensor:
        """The encodings (b, dim) of ``tokens``; with ``targets`` (b, m), the teacher-forced logits
        (b, m, v) of decoding them from the encodings (input: bos, targets[:, :-1])."""
        encodings = self.encode(tokens)
        if targets is None:
            return encodings
        if targets.ndim != 2 or targets.shape[0] != tokens.shape[0]:
            raise ValueError(f"targets must be ({tokens.shape[0]}, m) token ids, got {tuple(targets.shape)}")
        inp = torch.cat((torch.full_like(targets[:, :1], self.bos_id), targets[:, :-1]), dim=1)
        return self.decoder(inp, **self._prefix(encodings))[:, 1:]


__all__ = ["ROLE_SCHEMES", "num_roles_for_scheme", "role_ids_for_tokens", "TPREncoder", "DiscoverDecoder"]
