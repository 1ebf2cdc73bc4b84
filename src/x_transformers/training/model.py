"""Building the library's model from a config's ``model`` keywords; the library validates them."""

from __future__ import annotations

from torch import nn

from .config import CLIError, TrainConfig


def build_model(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """``decoder``: TransformerWrapper(attn_layers=Decoder(...)); ``xtransformer``: XTransformer(...).
    ``num_tokens`` defaults to the tokenizer's vocabulary, ``max_seq_len`` to the config's seq_len
    (plus the start token for the encoder-decoder)."""
    from ..config import ConfigConflictError
    from ..layers import Decoder
    from ..wrappers import WRAPPER_KEYS, TransformerWrapper, XTransformer

    kw = dict(cfg.model)
    for key in ("dim", "depth"):
        if key not in kw:
            raise CLIError(f"model.{key} is not set: give it in the config or with --set model.{key}=N")
    kw.setdefault("num_tokens", vocab_size)
    kw.setdefault("max_seq_len", cfg.seq_len + (1 if cfg.arch == "xtransformer" else 0))
    if kw["num_tokens"] < vocab_size:
        raise CLIError(f"model.num_tokens ({kw['num_tokens']}) is smaller than the tokenizer's vocabulary ({vocab_size})")
    try:
        if cfg.arch == "xtransformer":
            return XTransformer(**kw)
        wrapper = {k: kw.pop(k) for k in list(kw) if k in WRAPPER_KEYS}
        return TransformerWrapper(attn_layers=Decoder(**kw), **wrapper)
    except (TypeError, ValueError, ConfigConflictError) as e:
        raise CLIError(f"model: {e}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
