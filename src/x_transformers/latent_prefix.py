"""What the latent-variable wrappers (``gpt_vae``, ``xm_latent_decoder``) share: checking a prompt,
and sampling from a causal ``TransformerWrapper`` whose input starts with per-row embeddings
(``prepend_embeds``: latent tokens) ahead of the prompt.

Prefixed decoding recomputes the whole window each step: the key/value cache does not hold
prepended embeddings yet (``TransformerWrapper`` refuses ``prepend_embeds`` with a cache, since the
cache counts prefix columns as token positions). Without a prefix the wrappers decode through
``AutoregressiveWrapper.generate`` and its cache.

Legend: b batch, n prompt length, P prefix length, d model dim, v vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .decoding import GenerationConfig
from .sampling import sample

# generate keywords the prefixed sampler honours (the rest of AutoregressiveWrapper.generate's are
# about caches, beams and compilation, which need the cache)
PREFIX_GENERATE_KEYS = ("eos_token", "temperature", "filter_logits_fn", "filter_kwargs", "generator",
                        "restrict_to_max_seq_len")


def check_prompts(prompts, num_tokens: int, name: str = "prompts") -> tuple[Tensor, bool]:
    """(b, n) or (n,) token ids -> ((b, n), whether a batch dimension was added)."""
    if not isinstance(prompts, Tensor) or prompts.is_floating_point() or prompts.dtype == torch.bool \
            or prompts.ndim not in (1, 2) or prompts.shape[-1] == 0:
        raise ValueError(f"{name} must be non-empty integer token ids of shape (n,) or (b, n), got "
                         f"{getattr(prompts, 'dtype', type(prompts).__name__)} {tuple(getattr(prompts, 'shape', ()))}")
    if ((prompts < 0) | (prompts >= num_tokens)).any():
        raise ValueError(f"{name} holds ids outside [0, {num_tokens})")
    return (prompts[None], True) if prompts.ndim == 1 else (prompts, False)


@torch.no_grad()
def generate_with_prefix(net, prompts: Tensor, seq_len: int, prefix: Tensor, *, pad_value: int = 0,
                         where: str = "generate", **kwargs) -> Tensor:
    """Sample ``seq_len`` tokens after ``prompts`` (b, n) from ``net`` reading ``prefix`` (b, P, d)
    ahead of them. Keywords: ``PREFIX_GENERATE_KEYS`` (as ``AutoregressiveWrapper.generate``; no
    filter by default). Rows that emitted ``eos_token`` are padded with ``pad_value``. -> (b, seq_len)."""
    unknown = sorted(set(kwargs) - set(PREFIX_GENERATE_KEYS))
    if unknown:
        raise TypeError(f"{where}: {unknown[0]!r} is not supported when decoding with latents (the prefixed "
                        f"sampler takes {', '.join(PREFIX_GENERATE_KEYS)})")
    window = kwargs.pop("restrict_to_max_seq_len", False)
    cfg = GenerationConfig(seq_len=seq_len, num_tokens=net.num_tokens, **kwargs)
    b = prompts.shape[0]
    if prefix.ndim != 3 or prefix.shape[0] != b:
        raise ValueError(f"{where}: the latent prefix must be (b={b}, P, dim), got {tuple(prefix.shape)}")
    was_training = net.training
    net.eval()
    try:
        seq, done = prompts, torch.zeros(b, dtype=torch.bool, device=prompts.device)
        for _ in range(seq_len):
            visible = seq[:, -net.max_seq_len:] if window and net.max_seq_len else seq
            logits = net(visible, prepend_embeds=prefix)[:, -1]  # (b, v)
            token = sample(logits, temperature=cfg.temperature, filter_logits_fn=cfg.filter_logits_fn,
                           filter_kwargs=cfg.filter_kwargs, generator=cfg.generator)
            if cfg.eos_token is not None:
                token = token.masked_fill(done, pad_value)
                done = done | (token == cfg.eos_token)
            seq = torch.cat((seq, token[:, None]), dim=1)
            if cfg.eos_token is not None and bool(done.all()):
                break
    finally:
        net.train(was_training)
    out = seq[:, prompts.shape[1]:]
    if out.shape[1] < seq_len:
        out = torch.nn.functional.pad(out, (0, seq_len - out.shape[1]), value=pad_value)
    return out
