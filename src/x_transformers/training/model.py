"""Building the library's model from a config's ``model`` keywords (the library validates them), or
from a Hugging Face folder (``init_from``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
        if key not in kw and not (key == "depth" and {"enc_depth", "dec_depth"} <= kw.keys()):
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


# ----------------------------------------------------------------------------------------------
# starting from a Hugging Face folder (``init_from``)


def _weightless(key: str) -> bool:
    """Keywords that may differ from the checkpoint's: they change no weight (dropout, kernels)."""
    return key.endswith("dropout") or key.endswith("backend")


def pretrained_tokenizer(folder: Path, given: str | None, vocab: int, byte_level: bool = False) -> str | None:
    """The tokenizer file to use with a checkpoint of ``vocab`` tokens: ``given``, else the folder's
    tokenizer.json, else None (bytes), which must be the checkpoint's whole vocabulary."""
    from .data import load_tokenizer

    file = folder / "tokenizer.json"
    path = None if byte_level else given or (str(file) if file.is_file() else None)
    if path is None:
        if vocab != 256:
            what = "the synthetic tasks are" if byte_level else f"{folder} has no tokenizer.json, so tokens are"
            raise CLIError(f"{what} bytes (256) but the checkpoint has {vocab} tokens; "
                           + ("start from a byte-level checkpoint" if byte_level else
                              "add the folder's tokenizer.json, or give --tokenizer FILE"))
        return None
    size = load_tokenizer(path).vocab_size
    if size > vocab:
        raise CLIError(f"tokenizer {path} has {size} tokens, more than the checkpoint's {vocab}")
    return path


def load_pretrained(cfg: TrainConfig) -> tuple[TrainConfig, nn.Module]:
    """``cfg.init_from`` -> (cfg whose arch, model keywords and tokenizer come from the folder, the
    model with the folder's weights). The keywords are stored, so a run resumes, evaluates and
    generates without the folder. Keys in ``cfg.model`` that the checkpoint also sets must agree
    with it (dropout and kernel choices excepted); others pass to ``from_pretrained``, which refuses
    any that would add weights."""
    from .. import hf
    from ..config import ConfigConflictError
    from ..wrappers import XTransformer

    folder = Path(cfg.init_from)
    where = f"--init-from {folder}"
    try:
        hf_cfg = hf.read_config(folder)
        family = hf.family_of(hf_cfg)
        _, guess = family.keywords(hf_cfg, untied_head=False)
    except (OSError, ValueError) as e:
        raise CLIError(f"{where}: {e}")
    user = dict(cfg.model)
    overrides = {k: v for k, v in user.items() if k not in guess or (_weightless(k) and v != guess[k])}
    try:
        model = hf.from_pretrained(folder, **overrides)
    except (TypeError, ValueError, ConfigConflictError) as e:
        raise CLIError(f"{where}: {str(e).splitlines()[0]}")
    seq2seq = isinstance(model, XTransformer)
    head = model.decoder if seq2seq else model
    _, kw = family.keywords(hf_cfg, untied_head=head.to_logits is not None)
    for key, value in user.items():
        if key in kw and kw[key] != value and not _weightless(key):
            raise CLIError(f"model.{key}={value!r} conflicts with the checkpoint's {key}={kw[key]!r} ({where}); "
                           "drop it: the architecture comes from the checkpoint")
    arch = "xtransformer" if seq2seq else "decoder"
    if seq2seq and cfg.task is None:
        raise CLIError(f"{where} is an encoder-decoder ({family.model_type}): set task (copy, reverse, sort or addition)")
    if not seq2seq and cfg.task is not None:
        raise CLIError(f"task {cfg.task!r} needs an encoder-decoder; {where} is a decoder ({family.model_type})")
    limit = head.max_seq_len if head.pos_emb is not None else None
    if limit is not None and cfg.seq_len + seq2seq > limit:
        raise CLIError(f"seq_len ({cfg.seq_len}) exceeds the checkpoint's {limit} learned positions ({where})")
    tokenizer = pretrained_tokenizer(folder, cfg.tokenizer, head.num_tokens, byte_level=seq2seq)
    resolved = dataclasses.replace(cfg, arch=arch, model={**kw, **overrides}, tokenizer=tokenizer).validate()
    return resolved, model
