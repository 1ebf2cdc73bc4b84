"""``GPTVAE``: a variational autoencoder around a GPT (upstream x-transformers' ``gpt_vae``).

An ``Encoder`` reads the whole sequence and pools it into a Gaussian posterior q(z | x) over a
latent z (Kingma & Welling, "Auto-Encoding Variational Bayes", arXiv 1312.6114); a sample of z
(the reparameterisation trick) is projected to one embedding put ahead of the tokens of a causal
``Decoder``, which is trained on the next-token loss. The loss adds the KL divergence of the
posterior from the standard normal prior. This is the CVAE of ACT ("Learning Fine-Grained Bimanual
Manipulation with Low-Cost Hardware", Zhao et al. 2023, arXiv 2304.13705) applied to a GPT: the
latent is a "style" that steers generation. ``vae_kl_div_floor`` is the free-bits floor per latent
dimension (Kingma et al. 2016, arXiv 1606.04934), as the Free Transformer uses it. During training
the latent is hidden from the decoder for a ``latents_dropout_prob`` fraction of the rows, so the
decoder also works without one.

Legend: b batch, n sequence length, d model dim, l latent dim, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoregressive import AutoregressiveWrapper
from .hub import Pretrained
from .config import _positive_int
from .latent_prefix import check_number, check_prompts, gaussian_kl, generate_with_prefix
from .layers import Decoder, Encoder
from .wrappers import TransformerWrapper


class GPTVAE(Pretrained, nn.Module):
    """A GPT whose generation is steered by a latent inferred from a sequence (see the module docstring).

    ``num_tokens``, ``dim``, ``depth`` (decoder), ``enc_depth``, ``max_seq_len``; ``dim_latent``
    (default ``dim``); ``heads`` / ``attn_dim_head`` and any further keyword go to both stacks,
    ``enc_kwargs`` / ``dec_kwargs`` to one. ``encoder``: a module of your own mapping (ids (b, n),
    mask=(b, n)) to pooled vectors (b, dim), in place of the built one. ``pad_id``: the id of
    padding (ignored by the loss and the encoder; fed to the decoder as 0)."""

    def __init__(self, *, num_tokens: int, dim: int, depth: int, enc_depth: int, max_seq_len: int,
                 dim_latent: int | None = None, attn_dim_head: int = 64, heads: int = 8, enc_kwargs: dict | None = None,
                 dec_kwargs: dict | None = None, vae_kl_loss_weight: float = 1.0, vae_kl_div_floor: float = 0.0,
                 latents_dropout_prob: float = 0.5, pad_id: int = -1, encoder: nn.Module | None = None, **kwargs):
        super().__init__()
        for name, value in (("num_tokens", num_tokens), ("dim", dim), ("depth", depth), ("enc_depth", enc_depth),
                            ("max_seq_len", max_seq_len)):
            _positive_int(name, value)
        _positive_int("dim_latent", dim_latent, allow_none=True)
        check_number("vae_kl_loss_weight", vae_kl_loss_weight, low=0.0)
        check_number("vae_kl_div_floor", vae_kl_div_floor, low=0.0)
        check_number("latents_dropout_prob", latents_dropout_prob, 0.0, 1.0)
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise ValueError(f"pad_id must be an integer token id (-1: no id of the vocabulary), got {pad_id!r}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a module mapping ids (b, n) to pooled vectors (b, {dim}), "
                            f"got {type(encoder).__name__}")
        for name, value in (("enc_kwargs", enc_kwargs), ("dec_kwargs", dec_kwargs)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of Encoder/Decoder keywords, got {type(value).__name__}")
        stack = dict(dim=dim, heads=heads, attn_dim_head=attn_dim_head, **kwargs)
        dim_latent = dim_latent or dim
        self.encoder = encoder or TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=max_seq_len, return_only_embed=True, average_pool_embed=True,
            attn_layers=Encoder(depth=enc_depth, **stack, **(enc_kwargs or {})))
        self.to_latent_mean_log_variance = nn.Linear(dim, dim_latent * 2)  # -> (mean, log variance)
        self.from_latent_to_prepend_token = nn.Linear(dim_latent, dim)
        self.decoder = TransformerWrapper(num_tokens=num_tokens, max_seq_len=max_seq_len,
                                          attn_layers=Decoder(depth=depth, **stack, **(dec_kwargs or {})))
        self.dim, self.dim_latent, self.num_tokens, self.pad_id = dim, dim_latent, num_tokens, pad_id
        self.vae_kl_loss_weight = float(vae_kl_loss_weight)
        self.vae_kl_div_floor = float(vae_kl_div_floor)
        self.latents_dropout_prob = float(latents_dropout_prob)

    @property
    def device(self):
        return next(self.parameters()).device

    def _check_seq(self, seq, name):
        if not isinstance(seq, Tensor) or seq.ndim != 2 or seq.is_floating_point() or seq.dtype == torch.bool \
                or 0 in seq.shape:
            raise ValueError(f"{name} must be non-empty integer token ids of shape (b, n), got "
                             f"{getattr(seq, 'dtype', type(seq).__name__)} {tuple(getattr(seq, 'shape', ()))}")
        kept = seq[seq != self.pad_id]
        if ((kept < 0) | (kept >= self.num_tokens)).any():
            raise ValueError(f"{name} holds ids outside [0, {self.num_tokens}) that are not pad_id ({self.pad_id})")

    def encode_to_latents(self, seq: Tensor, return_mean_log_var: bool = False):
        """(b, n) ids -> a latent (b, l) drawn from the posterior (with its (mean, log variance))."""
        self._check_seq(seq, "seq")
        mask = seq != self.pad_id
        pooled = self.encoder(seq.masked_fill(~mask, 0), mask=mask)
        if not isinstance(pooled, Tensor) or pooled.shape != (seq.shape[0], self.dim):
            raise ValueError(f"the encoder must return pooled vectors ({seq.shape[0]}, {self.dim}), got "
                             f"{tuple(getattr(pooled, 'shape', ())) or type(pooled).__name__}")
        mean, log_var = self.to_latent_mean_log_variance(pooled).chunk(2, dim=-1)  # (b, l) each
        latents = mean + (0.5 * log_var).exp() * torch.randn_like(mean)  # reparameterisation trick
        return (latents, (mean, log_var)) if return_mean_log_var else latents

    def latent_token(self, latents: Tensor) -> Tensor:
        """(b, l) -> the decoder's prefix embedding (b, 1, d)."""
        return self.from_latent_to_prepend_token(latents)[:, None]

    def forward(self, seq: Tensor, seq_for_latents: Tensor | None = None, return_all_losses: bool = False):
        """seq (b, n) -> next-token loss + ``vae_kl_loss_weight`` * KL, with the latent inferred from
        ``seq_for_latents`` (default ``seq``); ``return_all_losses``: (total, (ar_loss, kl_loss))."""
        self._check_seq(seq, "seq")
        if seq.shape[1] < 2:
            raise ValueError(f"seq must hold at least 2 tokens per row (a next-token loss), got {seq.shape[1]}")
        source = seq if seq_for_latents is None else seq_for_latents
        if source.shape[0] != seq.shape[0]:
            raise ValueError(f"seq_for_latents has batch {source.shape[0]} but seq has {seq.shape[0]}")
        latents, (mean, log_var) = self.encode_to_latents(source, return_mean_log_var=True)
        b = seq.shape[0]
        shown = torch.ones(b, dtype=torch.bool, device=seq.device)
        if self.training and self.latents_dropout_prob > 0:  # dropped rows: the latent is a masked-out key
            shown = torch.rand(b, device=seq.device) >= self.latents_dropout_prob
        inp, target = seq[:, :-1], seq[:, 1:]
        keep = inp != self.pad_id
        logits = self.decoder(inp.masked_fill(~keep, 0), keep, prepend_embeds=self.latent_token(latents),
                              prepend_mask=shown[:, None], excise_prepend_embeds=True)  # (b, n-1, v)
        ar_loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=self.pad_id)
        kl = F.relu(gaussian_kl(mean, log_var) - self.vae_kl_div_floor).sum(dim=-1).mean()
        total = ar_loss + kl * self.vae_kl_loss_weight
        return (total, (ar_loss, kl)) if return_all_losses else total

    @torch.no_grad()
    def generate(self, prompts: Tensor, seq_len: int, latents=None, seq_for_latents: Tensor | None = None,
                 **generate_kwargs) -> Tensor:
        """``seq_len`` new tokens after ``prompts`` ((b, n) or (n,)), steered by ``latents`` ((b, l),
        (l,) for every row, or a list of numbers) or by the latent inferred from ``seq_for_latents``
        (b, m); without either, the decoder runs unconditioned. Every keyword of
        ``AutoregressiveWrapper.generate`` applies (the latent's token is cached by the prefill)."""
        if latents is not None and seq_for_latents is not None:
            raise ValueError("pass latents or seq_for_latents, not both (seq_for_latents is encoded into latents)")
        rows, unbatched = check_prompts(prompts, self.num_tokens)
        b = rows.shape[0]
        if seq_for_latents is not None:
            if seq_for_latents.shape[0] != b:
                raise ValueError(f"seq_for_latents has batch {getattr(seq_for_latents, 'shape', ())[:1]} "
                                 f"but the prompts have {b}")
            was_training = self.training
            self.eval()
            try:
                latents = self.encode_to_latents(seq_for_latents)
            finally:
                self.train(was_training)
        if latents is None:
            out = AutoregressiveWrapper(self.decoder).generate(rows, seq_len, **generate_kwargs)
            return out[0] if unbatched else out
        latents = torch.as_tensor(latents, dtype=self.from_latent_to_prepend_token.weight.dtype, device=rows.device)
        if latents.ndim == 1:
            latents = latents.expand(b, -1)
        if latents.shape != (b, self.dim_latent):
            raise ValueError(f"latents must be (b={b}, dim_latent={self.dim_latent}) or ({self.dim_latent},), "
                             f"got {tuple(latents.shape)}")
        out = generate_with_prefix(self.decoder, rows, seq_len, self.latent_token(latents),
                                   where="GPTVAE.generate", **generate_kwargs)
        return out[0] if unbatched else out


__all__ = ["GPTVAE"]
