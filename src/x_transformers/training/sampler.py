"""A deliberately tiny sampler over the model's plain forward (no cache), used to print a sample at
each validation. Kept isolated so it can be swapped for the library's cached ``generate``."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, prompt: torch.Tensor, steps: int, temperature: float = 1.0, window: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt (b, n) -> (b, n + steps). Greedy when temperature is 0; each step re-reads at most
    ``window`` tokens (the model's context)."""
    out = prompt
    for _ in range(steps):
        logits = model(out if window is None else out[:, -window:])[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(out.device)
        out = torch.cat((out, nxt), dim=-1)
    return out


@torch.no_grad()
def greedy_seq2seq(model, src: torch.Tensor, length: int, bos: int) -> torch.Tensor:
    """Encoder-decoder greedy decoding: src (b, n) -> target (b, length)."""
    tgt = torch.full((src.shape[0], 1), bos, dtype=torch.long, device=src.device)
    for _ in range(length):
        nxt = model(src, tgt)[:, -1].argmax(-1, keepdim=True)
        tgt = torch.cat((tgt, nxt), dim=-1)
    return tgt[:, 1:]
