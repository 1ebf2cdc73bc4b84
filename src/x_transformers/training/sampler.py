"""Samples printed at each validation and by ``xtransformers generate``: the library's own cached
generation (``AutoregressiveWrapper.generate`` for a decoder, ``XTransformer.generate`` for the
encoder-decoder), seeded by a generator of their own so training's RNG stream is left alone."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..autoregressive import AutoregressiveWrapper


@contextmanager
def gathered(model):
    """FSDP2 gathers a module's own parameters in its forward hook; generation reaches the root's
    parameters (token embedding, head) outside the root's forward, so gather them around it."""
    fsdp = hasattr(model, "unshard") and hasattr(model, "reshard")
    if fsdp:
        model.unshard()
    try:
        yield
    finally:
        if fsdp:
            model.reshard()


@torch.no_grad()
def sample(model, prompt: torch.Tensor, steps: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt (b, n) -> (b, n + steps), with a KV cache where the model has one (a feature that mixes
    tokens outside attention, e.g. shift_tokens, reruns the sequence). Greedy when temperature is 0."""
    new = AutoregressiveWrapper(model).generate(prompt, steps, temperature=temperature, cache_kv=_cacheable(model),
                                                generator=generator)
    return torch.cat((prompt, new), dim=-1)


def _cacheable(model) -> bool:
    """A causal stack whose blocks mix tokens only through attention (not shift_tokens,
    mv_split_residual or selective attention, which a key/value cache cannot continue)."""
    layers = getattr(model, "attn_layers", None)
    cfg, attn = getattr(layers, "cfg", None), getattr(layers, "attn_cfg", None)
    return bool(getattr(model, "can_cache_kv", True)) and not (
        getattr(cfg, "shift_tokens", 0) or getattr(cfg, "mv_split_residual", False) or getattr(attn, "selective", False))


@torch.no_grad()
def greedy_seq2seq(model, src: torch.Tensor, length: int, bos: int) -> torch.Tensor:
    """Encoder-decoder greedy decoding: src (b, n) -> target (b, length)."""
    start = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
    with gathered(model):
        return model.generate(src, start, length, temperature=0.0, cache_kv=True)
