"""xVal (Golkar et al., 2310.02989): numbers as one special token whose embedding is scaled by
the number's value, and a second head that regresses the value back.

``XValTransformerWrapper`` is a :class:`~x_transformers.wrappers.TransformerWrapper` whose token
embedding at ``numerical_token_id`` positions is multiplied by the matching entry of ``x_num``
(every other position by 1), with a linear number head beside the logits.
``XValAutoregressiveWrapper`` trains it (next-token cross-entropy plus the squared error of the
next number where the next token is the number token) and generates tokens and numbers.

Legend: b batch, n tokens, v vocabulary, d model dim.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .config import _positive_int
from .hub import Pretrained
from .layers import AttentionLayers
from .positional import check_cache_reach
from .sampling import check_filter_kwargs, sample, top_k
from .wrappers import TransformerWrapper


class XValOutput(NamedTuple):
    logits: Tensor  # (b, n, v)
    numbers: Tensor  # (b, n): the number predicted at each position


class LossBreakdown(NamedTuple):
    cross_entropy_loss: Tensor  # (b, n - 1), unreduced
    numerical_mse_loss: Tensor  # (b, n - 1), zero where the target is not the number token


class GenerateReturn(NamedTuple):
    sampled_token_ids: Tensor  # (b, seq_len)
    sampled_numbers: Tensor  # (b, seq_len), NaN where the token is not the number token
    is_number_mask: Tensor  # (b, seq_len) bool


class XValTransformerWrapper(Pretrained, nn.Module):
    """Tokens (b, n) and numbers (b, n) -> (logits (b, n, v), numbers (b, n)).

    ``numerical_token_id``: the token that stands for "a number"; its embedding is scaled by the
    value in ``x_num`` at that position (values elsewhere are ignored, NaN allowed there).
    Other keywords are :class:`TransformerWrapper`'s that upstream's xVal wrapper has:
    ``emb_dim``, ``logits_dim``, ``tie_embedding``, ``num_memory_tokens``, ``emb_dropout``,
    ``use_abs_pos_emb``, ``scaled_sinu_pos_emb``. ``max_mem_len`` (Transformer-XL memories) is
    accepted only at 0. The untied head has a bias, as upstream's.
    """

    def __init__(self, *, num_tokens: int, max_seq_len: int, numerical_token_id: int, attn_layers: AttentionLayers,
                 emb_dim: int | None = None, logits_dim: int | None = None, tie_embedding: bool = False,
                 max_mem_len: int = 0, num_memory_tokens: int | None = None, emb_dropout: float = 0.0,
                 use_abs_pos_emb: bool = True, scaled_sinu_pos_emb: bool = False):
        super().__init__()
        _positive_int("num_tokens", num_tokens)
        if isinstance(numerical_token_id, bool) or not isinstance(numerical_token_id, int) \
                or not 0 <= numerical_token_id < num_tokens:
            raise ValueError(f"numerical_token_id must be a token id in [0, {num_tokens}) (num_tokens={num_tokens}), "
                             f"got {numerical_token_id!r}")
        if max_mem_len:
            raise ValueError(f"max_mem_len={max_mem_len!r}: Transformer-XL memories are not implemented here; "
                             f"leave max_mem_len=0")
        self.transformer = TransformerWrapper(
            num_tokens=num_tokens, max_seq_len=max_seq_len, attn_layers=attn_layers, emb_dim=emb_dim,
            logits_dim=logits_dim, tie_embedding=tie_embedding, num_memory_tokens=num_memory_tokens,
            emb_dropout=emb_dropout, use_abs_pos_emb=use_abs_pos_emb, scaled_sinu_pos_emb=scaled_sinu_pos_emb)
        self.numerical_token_id = numerical_token_id
        self.num_tokens = num_tokens
        self.max_seq_len = max_seq_len
        dim = attn_layers.dim
        # upstream's untied head is nn.Linear(dim, logits_dim) with a bias; TransformerWrapper's has none
        self.logits_bias = nn.Parameter(torch.zeros(logits_dim or num_tokens)) if not tie_embedding else None
        self.to_numerical_output = nn.Linear(dim, 1)

    @property
    def attn_layers(self) -> AttentionLayers:
        return self.transformer.attn_layers

    @property
    def token_emb(self) -> nn.Embedding:
        return self.transformer.token_emb

    @property
    def pos_emb(self):
        return self.transformer.pos_emb

    def number_scale(self, x: Tensor, x_num: Tensor) -> Tensor:
        """(b, n) -> (b, n): the factor each token's embedding is multiplied by (x_num at number
        tokens, 1 elsewhere)."""
        if not isinstance(x_num, Tensor) or not x_num.is_floating_point():
            raise ValueError(f"x_num must be a float tensor of shape {tuple(x.shape)} (the numbers), "
                             f"got {type(x_num).__name__ if not isinstance(x_num, Tensor) else x_num.dtype}")
        if x_num.shape != x.shape:
            raise ValueError(f"x_num must have the shape of x, {tuple(x.shape)}, got {tuple(x_num.shape)}")
        is_number = x == self.numerical_token_id
        scale = torch.where(is_number, x_num, torch.ones_like(x_num))
        if not torch.compiler.is_compiling() and not torch.isfinite(scale).all():
            raise ValueError("x_num holds NaN or inf at a numerical_token_id position")
        return scale

    def forward(self, x: Tensor, x_num: Tensor, mask: Tensor | None = None, *, return_embeddings: bool = False,
                cache: KVCache | None = None, **kwargs):
        """x (b, n) token ids, x_num (b, n) numbers -> ``XValOutput(logits, numbers)``, or the
        hidden states (b, n, d) with ``return_embeddings``. ``mask`` (b, n) bool, True = keep;
        ``cache`` a KVCache (causal stacks; x / x_num then hold only the new tokens); other
        keywords (``context``, ``pos``, ``return_attn`` ...) go to the TransformerWrapper."""
        if "sum_embeds" in kwargs:
            raise ValueError("sum_embeds is how this wrapper scales the number tokens; it cannot be given as well")
        self.transformer.check_inputs(x, mask)  # token ids before they index the embedding
        scale = self.number_scale(x, x_num)
        # emb * scale == emb + emb * (scale - 1): the scaling rides on the wrapper's sum_embeds, added
        # beside the position embedding exactly where upstream multiplies (before positions are added)
        emb = self.transformer.token_emb(x)
        extra = emb * (scale - 1).to(emb.dtype)[..., None]
        out = self.transformer(x, mask, return_embeddings=True, cache=cache, sum_embeds=extra, **kwargs)
        hidden, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        if return_embeddings:
            return (hidden, *rest) if rest else hidden
        logits = self.transformer.logits_from(hidden)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias
        numbers = self.to_numerical_output(hidden).squeeze(-1)
        result = XValOutput(logits, numbers)
        return (result, *rest) if rest else result


class XValAutoregressiveWrapper(Pretrained, nn.Module):
    """Next-token training and generation for an :class:`XValTransformerWrapper` on a causal stack.

    The loss at each predicted position is the cross-entropy of the next token plus
    ``numerical_loss_weight`` times the squared error of the next number where the next token is
    the number token; the mean is over positions whose target is kept (not ``ignore_index``, not
    masked), as upstream's.
    """

    def __init__(self, net: XValTransformerWrapper, ignore_index: int = -100, pad_value: int = 0,
                 numerical_loss_weight: float = 1.0):
        super().__init__()
        if not isinstance(net, XValTransformerWrapper):
            raise TypeError(f"net must be an XValTransformerWrapper, got {type(net).__name__}")
        if not net.attn_layers.causal:
            raise ValueError("XValAutoregressiveWrapper needs a causal stack (Decoder); this one is bidirectional")
        if isinstance(numerical_loss_weight, bool) or not isinstance(numerical_loss_weight, (int, float)) \
                or numerical_loss_weight < 0:
            raise ValueError(f"numerical_loss_weight must be a number >= 0, got {numerical_loss_weight!r}")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.ignore_index = ignore_index
        self.pad_value = pad_value
        self.numerical_loss_weight = numerical_loss_weight

    def forward(self, x: Tensor, x_num: Tensor, mask: Tensor | None = None, *, return_loss_breakdown: bool = False,
                **kwargs):
        """x (b, n) tokens, x_num (b, n) numbers -> the scalar loss (and a ``LossBreakdown`` of the
        unreduced terms with ``return_loss_breakdown``). ``mask`` is over x's n columns, or over
        the n - 1 targets (upstream's two conventions)."""
        if x.ndim != 2 or x.shape[1] < 2:
            raise ValueError(f"x must be (batch, seq >= 2) token ids to predict next tokens, got {tuple(x.shape)}")
        if not isinstance(x_num, Tensor) or x_num.shape != x.shape:
            raise ValueError(f"x_num must have the shape of x, {tuple(x.shape)}, "
                             f"got {tuple(x_num.shape) if isinstance(x_num, Tensor) else type(x_num).__name__}")
        inp, target = x[:, :-1], x[:, 1:]
        num_inp, num_target = x_num[:, :-1], x_num[:, 1:]
        target_mask = target != self.ignore_index
        in_mask = None
        if mask is not None:
            if mask.shape == x.shape:
                target_mask = target_mask & mask[:, 1:]
                in_mask = mask[:, :-1]
            elif mask.shape == target.shape:
                target_mask = target_mask & mask
            else:
                raise ValueError(f"mask must be (batch, seq) over x {tuple(x.shape)} or over the targets "
                                 f"{tuple(target.shape)}, got {tuple(mask.shape)}")
        logits, numbers = self.net(inp, num_inp, in_mask, **kwargs)

        ce = F.cross_entropy(logits.transpose(1, 2).float(), target, reduction="none", ignore_index=self.ignore_index)
        is_number = target == self.net.numerical_token_id
        num_target = num_target.masked_fill(~is_number, 0.0)  # NaN placeholders at other positions
        mse = F.mse_loss(numbers.float(), num_target.float(), reduction="none")
        mse = mse.masked_fill(~(is_number & target_mask), 0.0)
        loss = (ce + mse * self.numerical_loss_weight)[target_mask].mean()
        return (loss, LossBreakdown(ce, mse)) if return_loss_breakdown else loss

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, start_numbers: Tensor, seq_len: int,
                 filter_logits_fn: str | Callable | None = top_k, filter_kwargs: dict | None = None,
                 temperature: float = 1.0, *, cache_kv: bool = True, generator: torch.Generator | None = None,
                 **kwargs) -> GenerateReturn:
        """Continue ``start_tokens`` / ``start_numbers`` (b, n) by ``seq_len`` steps. Each step
        samples a token (filter, temperature; 0 is greedy) and takes the predicted number; a
        number token is fed back scaled by its predicted number. Returns the new tokens, their
        numbers (NaN where the token is not the number token) and that mask. ``cache_kv``: one
        token per step with the key/value cache; otherwise the last ``max_seq_len`` columns are
        rerun each step. ``kwargs`` go to the net."""
        _positive_int("seq_len", seq_len)
        check_filter_kwargs(filter_logits_fn, filter_kwargs)
        if start_tokens.ndim != 2:
            raise ValueError(f"start_tokens must be (batch, seq), got {tuple(start_tokens.shape)}")
        if not isinstance(start_numbers, Tensor) or start_numbers.shape != start_tokens.shape:
            raise ValueError(f"start_numbers must have the shape of start_tokens, {tuple(start_tokens.shape)}, got "
                             f"{tuple(start_numbers.shape) if isinstance(start_numbers, Tensor) else start_numbers!r}")
        n0 = start_tokens.shape[1]
        if cache_kv:
            check_cache_reach(self.net.pos_emb, self.max_seq_len, n0 + seq_len - 1)
        was_training = self.net.training
        self.net.eval()
        try:
            tokens, numbers = start_tokens, start_numbers.to(torch.get_default_dtype())
            cache = KVCache() if cache_kv else None
            step_tok, step_num = tokens, numbers
            for _ in range(seq_len):
                if cache is None:
                    step_tok, step_num = tokens[:, -self.max_seq_len:], numbers[:, -self.max_seq_len:]
                logits, pred = self.net(step_tok, step_num, cache=cache, **kwargs)
                nxt = sample(logits[:, -1], temperature=temperature, filter_logits_fn=filter_logits_fn,
                             filter_kwargs=filter_kwargs, generator=generator)[:, None]
                num = pred[:, -1:].to(numbers.dtype)
                tokens, numbers = torch.cat((tokens, nxt), dim=1), torch.cat((numbers, num), dim=1)
                step_tok, step_num = nxt, num
        finally:
            self.net.train(was_training)
        out, nums = tokens[:, n0:], numbers[:, n0:]
        is_number = out == self.net.numerical_token_id
        return GenerateReturn(out, nums.masked_fill(~is_number, float("nan")), is_number)


__all__ = ["XValTransformerWrapper", "XValAutoregressiveWrapper", "XValOutput", "LossBreakdown", "GenerateReturn"]
