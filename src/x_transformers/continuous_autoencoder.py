"""``ContinuousTransformerAutoencoder``: a sequence of vectors squeezed through one latent vector
(upstream x-transformers' ``continuous_autoencoder``; the "RL token" of Physical Intelligence,
https://www.pi.website/research/rlt, an encoder-decoder bottleneck over a model's embeddings).

An ``Encoder`` reads the frames, their masked mean goes through a bottleneck to a latent (b, l):
``deterministic`` (a linear map, optionally squashed) or ``variational`` (a Gaussian posterior with
its closed-form KL to the standard normal, 1312.6114). A causal ``Decoder`` reconstructs the frames
by teacher forcing: the latent, mapped to a frame, comes first, and the output at each position
predicts the next frame, so frame i is rebuilt from the latent and frames < i only.

Deliberate deviation from upstream 2.31.10: upstream's decoder reads the frames unshifted and its
output at frame i is compared with frame i itself, which the causal decoder sees: the identity
solves it without the latent. Here the input is shifted by one (the latent first), as teacher
forcing needs. For the same reason the latent is mapped into the input width (``dim_input``),
where upstream maps it to ``dim``. Upstream stores ``kl_div_floor`` without using it; here it is
the free-bits floor per latent dimension (1606.04934).

Legend: b batch, n frames, i input width (dim_input), d model dim, l latent dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .continuous import ContinuousTransformerWrapper, masked_mean
from .config import _positive_int
from .hub import Pretrained
from .latent_prefix import check_number, gaussian_kl
from .layers import Decoder, Encoder


class VariationalLatentBottleneck(nn.Module):
    """(b, d) -> a latent (b, l) drawn from N(mean, exp(log_var)), and the KL to N(0, 1) (mean over
    the batch of the sum over dimensions, each dimension's KL less ``kl_div_floor``, not below 0)."""

    def __init__(self, dim: int, dim_latent: int, kl_div_floor: float = 0.0):
        super().__init__()
        check_number("kl_div_floor", kl_div_floor, low=0.0)
        self.kl_div_floor = float(kl_div_floor)
        self.to_mean_log_var = nn.Linear(dim, dim_latent * 2)

    def forward(self, x: Tensor, return_unreduced_loss: bool = False):
        mean, log_var = self.to_mean_log_var(x).chunk(2, dim=-1)
        latents = mean + (0.5 * log_var).exp() * torch.randn_like(mean)  # reparameterisation trick
        kl = F.relu(gaussian_kl(mean, log_var) - self.kl_div_floor).sum(dim=-1)  # (b,)
        return latents, (kl if return_unreduced_loss else kl.mean())


class DeterministicLatentBottleneck(nn.Module):
    """(b, d) -> ``activation``(a linear map) (b, l); no auxiliary loss."""

    def __init__(self, dim: int, dim_latent: int, activation: nn.Module | None = None):
        super().__init__()
        if activation is not None and not callable(activation):
            raise TypeError(f"activation must be a module or callable (e.g. nn.Tanh()), got {type(activation).__name__}")
        self.proj = nn.Linear(dim, dim_latent)
        self.activation = activation if activation is not None else nn.Identity()

    def forward(self, x: Tensor, return_unreduced_loss: bool = False):
        return self.activation(self.proj(x)), None


BOTTLENECKS = {"deterministic": DeterministicLatentBottleneck, "variational": VariationalLatentBottleneck}
LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


class ContinuousTransformerAutoencoder(Pretrained, nn.Module):
    """Frames (b, n, i) -> one latent (b, l) -> the frames again (see the module docstring).

    ``dim``, ``enc_depth``, ``dec_depth``, ``max_seq_len``; ``dim_input`` (default ``dim``),
    ``dim_latent`` (default ``dim``); ``bottleneck`` (a module of your own: (b, d) ->
    (latents, aux loss or None)) or ``bottleneck_type`` ('deterministic' / 'variational') with its
    ``*_bottleneck_kwargs``; ``loss_type`` 'l1' / 'l2'; ``heads``, ``attn_dim_head`` and further
    keywords go to both stacks, ``enc_kwargs`` / ``dec_kwargs`` to one; ``latents_dropout_prob``:
    the fraction of training rows whose decoder gets no latent."""

    def __init__(self, *, dim: int, enc_depth: int, dec_depth: int, max_seq_len: int, dim_input: int | None = None,
                 dim_latent: int | None = None, bottleneck: nn.Module | None = None,
                 bottleneck_type: str = "deterministic", deterministic_bottleneck_kwargs: dict | None = None,
                 variational_bottleneck_kwargs: dict | None = None, loss_type: str = "l2", attn_dim_head: int = 64,
                 heads: int = 8, enc_kwargs: dict | None = None, dec_kwargs: dict | None = None,
                 latents_dropout_prob: float = 0.5, **kwargs):
        super().__init__()
        for name, value in (("dim", dim), ("enc_depth", enc_depth), ("dec_depth", dec_depth),
                            ("max_seq_len", max_seq_len)):
            _positive_int(name, value)
        _positive_int("dim_input", dim_input, allow_none=True)
        _positive_int("dim_latent", dim_latent, allow_none=True)
        check_number("latents_dropout_prob", latents_dropout_prob, 0.0, 1.0)
        if bottleneck_type not in BOTTLENECKS:
            raise ValueError(f"bottleneck_type must be one of {sorted(BOTTLENECKS)}, got {bottleneck_type!r}")
        if loss_type not in LOSSES:
            raise ValueError(f"loss_type must be one of {sorted(LOSSES)}, got {loss_type!r}")
        if bottleneck is not None and not isinstance(bottleneck, nn.Module):
            raise TypeError(f"bottleneck must be a module mapping (b, {dim}) to (latents, aux loss or None), "
                            f"got {type(bottleneck).__name__}")
        for name, value in (("enc_kwargs", enc_kwargs), ("dec_kwargs", dec_kwargs),
                            ("deterministic_bottleneck_kwargs", deterministic_bottleneck_kwargs),
                            ("variational_bottleneck_kwargs", variational_bottleneck_kwargs)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of keywords, got {type(value).__name__}")
        self.dim_input, self.dim_latent = dim_input or dim, dim_latent or dim
        stack = dict(dim=dim, heads=heads, attn_dim_head=attn_dim_head, **kwargs)
        frames = dict(dim_in=self.dim_input, max_seq_len=max_seq_len, use_identity_if_same_dim=True)
        self.encoder = ContinuousTransformerWrapper(**frames, attn_layers=Encoder(depth=enc_depth, **stack,
                                                                                  **(enc_kwargs or {})))
        if bottleneck is None:
            options = (deterministic_bottleneck_kwargs if bottleneck_type == "deterministic"
                       else variational_bottleneck_kwargs)
            bottleneck = BOTTLENECKS[bottleneck_type](dim, self.dim_latent, **(options or {}))
        self.bottleneck = bottleneck
        self.from_latent_to_prepend_token = nn.Linear(self.dim_latent, self.dim_input)  # the decoder's first frame
        self.decoder = ContinuousTransformerWrapper(**frames, dim_out=self.dim_input,
                                                    attn_layers=Decoder(depth=dec_depth, **stack, **(dec_kwargs or {})))
        self.loss_type = loss_type
        self.latents_dropout_prob = float(latents_dropout_prob)

    @property
    def device(self):
        return next(self.parameters()).device

    def _mask(self, seq: Tensor, lens: Tensor | None) -> Tensor | None:
        if not isinstance(seq, Tensor) or not seq.is_floating_point() or seq.ndim != 3 \
                or seq.shape[-1] != self.dim_input or 0 in seq.shape:
            raise ValueError(f"seq must be float frames (b, n, dim_input={self.dim_input}), got "
                             f"{getattr(seq, 'dtype', type(seq).__name__)} {tuple(getattr(seq, 'shape', ()))}")
        if lens is None:
            return None
        b, n = seq.shape[:2]
        if not isinstance(lens, Tensor) or lens.is_floating_point() or lens.dtype == torch.bool or lens.shape != (b,):
            raise ValueError(f"lens must be an integer tensor of shape ({b},), got "
                             f"{getattr(lens, 'dtype', type(lens).__name__)} {tuple(getattr(lens, 'shape', ()))}")
        if ((lens < 1) | (lens > n)).any():
            raise ValueError(f"lens must lie in [1, {n}] (the number of frames), got {lens.tolist()}")
        return torch.arange(n, device=seq.device)[None] < lens.to(seq.device)[:, None]

    def encode(self, seq: Tensor, lens: Tensor | None = None, return_aux_loss: bool = False,
               return_unreduced_loss: bool = False):
        """(b, n, i) frames (``lens`` (b,) kept per row) -> latents (b, l) (and the bottleneck's
        auxiliary loss: the KL, per row with ``return_unreduced_loss``; None when deterministic)."""
        mask = self._mask(seq, lens)
        pooled = masked_mean(self.encoder(seq, mask, return_embeddings=True), mask)  # (b, d)
        latents, aux = self.bottleneck(pooled, return_unreduced_loss=return_unreduced_loss)
        return (latents, aux) if return_aux_loss else latents

    def decode(self, latents: Tensor, seq: Tensor, lens: Tensor | None = None, shown: Tensor | None = None) -> Tensor:
        """Teacher-forced reconstruction (b, n, i) of ``seq`` from ``latents`` (b, l): output i reads
        the latent and frames < i. ``shown`` (b,) bool: rows without it get no latent (a zero,
        masked first frame)."""
        mask = self._mask(seq, lens)
        b = seq.shape[0]
        if not isinstance(latents, Tensor) or latents.shape != (b, self.dim_latent):
            raise ValueError(f"latents must be (b={b}, dim_latent={self.dim_latent}), got "
                             f"{tuple(getattr(latents, 'shape', ())) or type(latents).__name__}")
        first = self.from_latent_to_prepend_token(latents)[:, None]  # (b, 1, i)
        first_kept = torch.ones(b, 1, dtype=torch.bool, device=seq.device)
        if shown is not None:
            first = first * shown[:, None, None].to(first.dtype)  # no trace of the latent in the residual stream
            first_kept = shown[:, None]
        inp = torch.cat((first, seq[:, :-1]), dim=1)  # (b, n, i): shifted right by the latent
        inp_mask = None
        if mask is not None or shown is not None:
            frames = mask[:, :-1] if mask is not None else torch.ones_like(seq[:, :-1, 0], dtype=torch.bool)
            inp_mask = torch.cat((first_kept, frames), dim=1)
        return self.decoder(inp, inp_mask)

    def forward(self, seq: Tensor, lens: Tensor | None = None, return_all_losses: bool = False,
                return_unreduced_loss: bool = False):
        """(b, n, i) -> reconstruction loss (mean over kept frames and features) + the bottleneck's
        loss. ``return_unreduced_loss``: per row (b,); ``return_all_losses``: (total, (recon, aux))."""
        mask = self._mask(seq, lens)
        latents, aux = self.encode(seq, lens, return_aux_loss=True, return_unreduced_loss=return_unreduced_loss)
        shown = None
        if self.training and self.latents_dropout_prob > 0:
            shown = torch.rand(seq.shape[0], device=seq.device) >= self.latents_dropout_prob
        recon = self.decode(latents, seq, lens, shown)
        err = LOSSES[self.loss_type](recon, seq, reduction="none").mean(dim=-1)  # (b, n)
        keep = torch.ones_like(err) if mask is None else mask.to(err.dtype)
        if return_unreduced_loss:
            recon_loss = (err * keep).sum(-1) / keep.sum(-1)
        else:
            recon_loss = (err * keep).sum() / keep.sum()
        total = recon_loss if aux is None else recon_loss + aux
        return (total, (recon_loss, aux)) if return_all_losses else total


__all__ = ["ContinuousTransformerAutoencoder", "VariationalLatentBottleneck", "DeterministicLatentBottleneck"]
