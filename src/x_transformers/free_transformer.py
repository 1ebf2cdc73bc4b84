"""The Free Transformer (Fleuret, "The Free Transformer", arXiv 2510.17558), at upstream's module
path: a decoder conditioned on random latent choices it learns to make, trained as a VAE.

The decoder is cut in two. Its first half (``decoder_head``, ``dec_head_depth`` blocks) reads the
tokens; an encoder (``enc_depth`` non-causal cross-attention blocks whose queries are one learned
token) reads the first half's output of the whole sequence and gives, per token (or per sequence),
``latent_bits`` logits. The binary mapper samples those bits, one code Z of ``2 ** latent_bits``,
as a one-hot whose gradient flows straight through the bits' probabilities. A linear map of Z is
added to the key/value input, not the queries', of the second half's (``decoder_tail``) first
self-attention; so Z at position t reaches the outputs at t and after, from that layer on.

The loss is next-token cross-entropy plus ``kl_loss_weight`` times the KL of the bits' posterior
from the uniform prior, with free bits: ``relu(bits * ln 2 - H(bits) - kl_loss_threshold)``
averaged over latents (zero when the posterior is the prior, and below the threshold). Generation
draws Z from the prior (uniform codes) unless ``latents`` are given.

Where we differ from upstream 2.31.10: the encoder's per-token queries and its context carry a
learned position embedding (upstream rotates them in cross-attention, which our cross-attention
does not); ``generate`` without ``latents`` samples them from the prior (upstream conditions on
nothing, a state training never produced).

Legend: b batch, n tokens, c codes (2 ** bits), d dim, v vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .autoregressive_wrapper import top_p
from .cache import KVCache
from .layers import Decoder, Encoder
from .sampling import check_filter_kwargs, sample
from .latent_prefix import check_prompts

__all__ = ["NAT", "BinaryMapper", "FreeTransformer", "binary_entropy"]

NAT = math.log(2)  # one bit, in nats


def binary_entropy(logits: Tensor) -> Tensor:
    """The entropy (nats) of independent bits with these logits (..., bits) -> (...)."""
    p = logits.sigmoid()
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).sum(dim=-1)


class BinaryMapper(nn.Module):
    """Bit logits (..., bits) -> a sampled one-hot code (..., 2 ** bits) and the free-bits KL from
    the uniform prior. ``straight_through`` (default in training): the one-hot's gradient is that
    of the codes' probabilities (the product of their bits' probabilities)."""

    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24:
            raise ValueError(f"latent_bits must be an int in [1, 24] (2 ** bits codes), got {bits!r}")
        if isinstance(kl_loss_threshold, bool) or not isinstance(kl_loss_threshold, (int, float)) \
                or not math.isfinite(kl_loss_threshold) or kl_loss_threshold < 0:
            raise ValueError(f"kl_loss_threshold must be a finite number >= 0 (nats), got {kl_loss_threshold!r}")
        self.bits = bits
        self.num_codes = 2 ** bits
        self.kl_loss_threshold = float(kl_loss_threshold)
        powers = 2 ** torch.arange(bits)
        self.register_buffer("power_two", powers, persistent=False)
        # (c, bits): code i's bits, least significant first
        self.register_buffer("codes", (torch.arange(self.num_codes)[:, None] & powers) != 0, persistent=False)

    def kl(self, logits: Tensor) -> Tensor:
        """The free-bits KL from the uniform prior, averaged over the latents: a scalar."""
        return F.relu(self.bits * NAT - binary_entropy(logits.float()) - self.kl_loss_threshold).mean()

    def forward(self, logits: Tensor, temperature: float = 1.0, straight_through: bool | None = None,
                calc_aux_loss: bool | None = None) -> tuple[Tensor, Tensor]:
        if logits.shape[-1] != self.bits:
            raise ValueError(f"logits must have a last dimension of {self.bits} (latent_bits), got {logits.shape[-1]}")
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss
        bits = (torch.rand_like(logits) < (logits / temperature).sigmoid()).long()
        one_hot = F.one_hot((bits * self.power_two).sum(dim=-1), self.num_codes).to(logits.dtype)
        aux = self.kl(logits) if calc_aux_loss else logits.new_zeros(())
        if straight_through:
            codes = self.codes.to(logits.dtype)  # (c, bits)
            log_probs = F.logsigmoid(logits) @ codes.t() + F.logsigmoid(-logits) @ (1 - codes).t()  # (..., c)
            probs = log_probs.exp()
            one_hot = one_hot + probs - probs.detach()
        return one_hot, aux


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


class FreeTransformer(nn.Module):
    """``forward(seq, seq_for_latents=None, return_all_losses=False)`` -> loss (and (ar_loss, kl_loss));
    ``generate(prompts, seq_len, latents=None)`` -> the sequences grown to ``seq_len`` tokens."""

    def __init__(self, *, num_tokens: int, dim: int, dec_head_depth: int, dec_tail_depth: int, max_seq_len: int,
                 enc_depth: int = 1, dim_latent: int | None = None, attn_dim_head: int = 64, heads: int = 8,
                 latent_bits: int = 16, per_token_latents: bool = True, kl_loss_threshold: float = NAT,
                 binary_mapper_kwargs: dict | None = None, enc_kwargs: dict | None = None,
                 dec_kwargs: dict | None = None, kl_loss_weight: float = 1.0, latent_dropout_prob: float = 0.0,
                 pad_id: int = -1, **kwargs):
        """``dec_head_depth`` (may be 0) / ``dec_tail_depth`` (>= 1): the blocks before / after the
        latent enters; ``enc_depth``: the encoder's blocks; ``per_token_latents``: a latent per
        token (the paper's) or one per sequence. Other keywords go to all three stacks,
        ``enc_kwargs`` / ``dec_kwargs`` to the encoder's / the decoder's."""
        super().__init__()
        for name, value, low in (("num_tokens", num_tokens, 1), ("dim", dim, 1), ("max_seq_len", max_seq_len, 1),
                                 ("dec_head_depth", dec_head_depth, 0), ("dec_tail_depth", dec_tail_depth, 1),
                                 ("enc_depth", enc_depth, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if dim_latent is not None and dim_latent != dim:
            raise ValueError(f"dim_latent: the latent code enters through a (2 ** latent_bits, dim) map, so it is "
                             f"dim wide; a separate width ({dim_latent}) is not used (upstream ignores it too)")
        for name, value in (("kl_loss_weight", kl_loss_weight), ("latent_dropout_prob", latent_dropout_prob)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "latent_dropout_prob" and value >= 1):
                raise ValueError(f"{name} must be a finite number >= 0{' and < 1' if 'prob' in name else ''}, "
                                 f"got {value!r}")
        if isinstance(pad_id, bool) or not isinstance(pad_id, int):
            raise ValueError(f"pad_id must be an int (-1: no padding), got {pad_id!r}")
        for name, value in (("binary_mapper_kwargs", binary_mapper_kwargs), ("enc_kwargs", enc_kwargs),
                            ("dec_kwargs", dec_kwargs)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name} must be a dict of keywords, got {type(value).__name__}")
        self.per_token_latents = _flag("per_token_latents", per_token_latents)
        self.num_tokens, self.max_seq_len, self.pad_id = num_tokens, max_seq_len, pad_id
        self.kl_loss_weight = float(kl_loss_weight)
        stack = dict(dim=dim, attn_dim_head=attn_dim_head, heads=heads, use_rmsnorm=True, **kwargs)

        self.token_emb = nn.Embedding(num_tokens, dim)
        self.token_unembed = nn.Linear(dim, num_tokens, bias=False)
        self.decoder_head = Decoder(depth=dec_head_depth, rotary_pos_emb=True, pre_norm_has_final_norm=False,
                                    **stack, **(dec_kwargs or {})) if dec_head_depth > 0 else None
        self.decoder_tail = Decoder(depth=dec_tail_depth, rotary_pos_emb=True, **stack, **(dec_kwargs or {}))
        # the encoder: learned queries cross-attending to the first half's output of the whole sequence
        self.query_token_for_latents = nn.Parameter(torch.randn(dim) * 1e-2)
        self.latent_pos_emb = nn.Embedding(max_seq_len, dim)  # per-token queries and their context
        nn.init.normal_(self.latent_pos_emb.weight, std=0.02)
        self.encoder = Encoder(depth=enc_depth, only_cross=True, **stack, **(enc_kwargs or {}))
        self.to_latent_bit_logits = nn.Linear(dim, latent_bits, bias=False)
        self.binary_mapper = BinaryMapper(latent_bits, kl_loss_threshold, **(binary_mapper_kwargs or {}))
        self.from_latent_to_condition = nn.Linear(self.binary_mapper.num_codes, dim, bias=False)
        self.latent_dropout = nn.Dropout(latent_dropout_prob)

    @property
    def device(self):
        return self.token_emb.weight.device

    # -- the pieces --------------------------------------------------------------------------

    def _head(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Token ids (b, n) -> the first half's hidden states (b, n, d)."""
        h = self.token_emb(tokens)
        return h if self.decoder_head is None else self.decoder_head(h, cache=cache)

    def encode_to_latents(self, decoder_head_embeds: Tensor, mask: Tensor | None = None,
                          return_kl_loss: bool = False, per_token_latents: bool | None = None):
        """The first half's states (b, n, d) of a whole sequence (``mask`` (b, n): the real tokens)
        -> one-hot codes (b, n | 1, c) (and the KL with ``return_kl_loss``)."""
        per_token = self.per_token_latents if per_token_latents is None else per_token_latents
        b, n, _ = decoder_head_embeds.shape
        if n > self.max_seq_len:
            raise ValueError(f"the sequence ({n} tokens) is longer than max_seq_len ({self.max_seq_len})")
        queries = self.query_token_for_latents.expand(b, 1, -1)
        context = decoder_head_embeds
        if per_token:  # one query per position; positions tie each query to its own token
            pos = self.latent_pos_emb.weight[:n]
            queries, context = queries + pos, context + pos
        pooled = self.encoder(queries, context=context, context_mask=mask)
        one_hot, kl = self.binary_mapper(self.to_latent_bit_logits(pooled), calc_aux_loss=return_kl_loss)
        return (one_hot, kl) if return_kl_loss else one_hot

    def _check_seq(self, name: str, seq, least: int):
        if not isinstance(seq, Tensor) or seq.ndim != 2 or seq.dtype not in (torch.long, torch.int) \
                or seq.shape[1] < least:
            raise ValueError(f"{name} must be a (batch, n >= {least}) tensor of token ids, got "
                             f"{getattr(seq, 'dtype', type(seq).__name__)} {tuple(getattr(seq, 'shape', ()))}")
        real = seq[seq != self.pad_id]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.num_tokens):
            raise ValueError(f"{name} has token ids outside [0, {self.num_tokens}) (num_tokens) other than "
                             f"pad_id={self.pad_id}")

    def logits_given_latents(self, tokens: Tensor, latents: Tensor) -> Tensor:
        """Next-token logits (b, n, v) of ``tokens`` (b, n) given codes ``latents`` (b, n | 1, c)."""
        condition = self.from_latent_to_condition(latents.to(self.token_emb.weight.dtype))
        return self.token_unembed(self.decoder_tail(self._head(tokens), self_attn_kv_residuals=condition))

    # -- training ------------------------------------------------------------------------------

    def forward(self, seq: Tensor, seq_for_latents: Tensor | None = None, return_all_losses: bool = False):
        """seq (b, n) -> the loss (with ``return_all_losses``: (loss, (ar_loss, kl_loss))).
        ``seq_for_latents`` (b, m): one latent per sequence, encoded from this sequence instead."""
        self._check_seq("seq", seq, 2)
        inp, labels = seq[:, :-1], seq[:, 1:]
        h = self._head(inp.masked_fill(inp == self.pad_id, 0))  # (b, n, d); padding (right) embedded as id 0
        if seq_for_latents is not None:
            self._check_seq("seq_for_latents", seq_for_latents, 1)
            if seq_for_latents.shape[0] != seq.shape[0]:
                raise ValueError(f"seq_for_latents must have seq's batch ({seq.shape[0]}), got {seq_for_latents.shape[0]}")
            src = self._head(seq_for_latents.masked_fill(seq_for_latents == self.pad_id, 0))
            latents, kl = self.encode_to_latents(src, mask=seq_for_latents != self.pad_id, return_kl_loss=True,
                                                 per_token_latents=False)
        else:
            latents, kl = self.encode_to_latents(h, mask=inp != self.pad_id, return_kl_loss=True)
        condition = self.from_latent_to_condition(self.latent_dropout(latents))  # (b, n | 1, d)
        out = self.decoder_tail(h, self_attn_kv_residuals=condition)
        logits = self.token_unembed(out)
        ar_loss = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=self.pad_id)
        loss = ar_loss + kl * self.kl_loss_weight
        return (loss, (ar_loss, kl)) if return_all_losses else loss

    # -- generation ------------------------------------------------------------------------------

    def _given_latents(self, latents, batch: int) -> Tensor:
        """Codes given as ids (() / (b,)) or one-hots / soft codes ((c,) / (b, c)) -> (b, 1, c)."""
        latents = torch.as_tensor(latents, device=self.device)
        c = self.binary_mapper.num_codes
        if not latents.is_floating_point():
            if latents.ndim > 1 or bool(((latents < 0) | (latents >= c)).any()):
                raise ValueError(f"latents as code ids must be an int or a (batch,) tensor in [0, {c}), "
                                 f"got shape {tuple(latents.shape)}")
            latents = F.one_hot(latents, c).float()
        if latents.shape[-1] != c or latents.ndim > 2 or (latents.ndim == 2 and latents.shape[0] != batch):
            raise ValueError(f"latents must be code ids, or codes of shape ({c},) or ({batch}, {c}), "
                             f"got {tuple(latents.shape)}")
        return latents.expand(batch, c)[:, None].to(self.token_emb.weight.dtype)

    def _prior(self, batch: int, n: int) -> Tensor:
        """Codes drawn from the uniform prior: (b, n, c) per token, (b, 1, c) per sequence."""
        c = self.binary_mapper.num_codes
        ids = torch.randint(0, c, (batch, n if self.per_token_latents else 1), device=self.device)
        return F.one_hot(ids, c).to(self.token_emb.weight.dtype)

    @torch.no_grad()
    def generate(self, prompts: Tensor, seq_len: int, latents=None, filter_logits_fn=top_p,
                 logit_filter_kwargs: dict | None = None, use_kv_cache: bool = True) -> Tensor:
        """Grow ``prompts`` ((b, n) or (n,)) to ``seq_len`` tokens, conditioned on ``latents`` (a code
        id, (b,) ids, or a (c,) / (b, c) code, the same for every position) or, when None, on codes
        drawn from the uniform prior. Returns the whole sequences (prompt included), as upstream."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        check_prompts(prompts, self.num_tokens)  # (latent_prefix.py: the latent wrappers' one check)
        logit_filter_kwargs = dict(thres=0.9) if logit_filter_kwargs is None else logit_filter_kwargs
        check_filter_kwargs(filter_logits_fn, logit_filter_kwargs)
        one = prompts.ndim == 1
        out = prompts[None] if one else prompts
        b = out.shape[0]
        codes = self._given_latents(latents, b) if latents is not None else self._prior(b, max(seq_len, out.shape[1]))
        per_position = codes.shape[1] > 1
        condition = self.from_latent_to_condition(codes)  # (b, seq_len | 1, d)
        was_training = self.training
        self.eval()
        try:
            head_cache, tail_cache = (KVCache(), KVCache()) if use_kv_cache else (None, None)
            done = 0  # tokens the caches hold
            while out.shape[1] < seq_len:
                new = out[:, done:] if use_kv_cache else out
                start = done if use_kv_cache else 0
                cond = condition[:, start:start + new.shape[1]] if per_position else condition
                h = self._head(new, head_cache)
                hidden = self.decoder_tail(h, cache=tail_cache, self_attn_kv_residuals=cond)[:, -1]
                token = sample(self.token_unembed(hidden), temperature=1.0, filter_logits_fn=filter_logits_fn,
                               filter_kwargs=logit_filter_kwargs)
                done = out.shape[1] if use_kv_cache else 0
                out = torch.cat((out, token[:, None]), dim=1)
        finally:
            self.train(was_training)
        return out[0] if one else out
