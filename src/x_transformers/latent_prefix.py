"""What the latent-variable wrappers (``gpt_vae``, ``continuous_autoencoder``, ``xm_latent_decoder``)
share: the closed-form Gaussian KL, number and prompt checks, and sampling from a causal ``TransformerWrapper`` whose input starts with per-row embeddings
(latent tokens) ahead of the prompt: ``AutoregressiveWrapper.generate(prepend_embeds=)``, whose
prefill puts them in the key/value cache.

Legend: b batch, n prompt length, P prefix length, d model dim, v vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .autoregressive import AutoregressiveWrapper


def gaussian_kl(mean: Tensor, log_var: Tensor) -> Tensor:
    """KL(N(mean, exp(log_var)) || N(0, 1)) per dimension, in closed form (same shape as mean)."""
    return 0.5 * (log_var.exp() + mean.square() - log_var - 1.0)


def check_number(name, value, low=None, high=None):
    """A real number (not a bool, not NaN) in [low, high] where given; else one line naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")


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
def generate_with_prefix(net, prompts: Tensor, seq_len: int, prefix: Tensor, *, where: str = "generate",
                         **kwargs) -> Tensor:
    """Sample ``seq_len`` tokens after ``prompts`` (b, n) from ``net`` reading ``prefix`` (b, P, d)
    ahead of them; every keyword of ``AutoregressiveWrapper.generate`` applies. -> (b, seq_len)."""
    if "prepend_embeds" in kwargs:
        raise TypeError(f"{where}: prepend_embeds is the latent's own prefix here; pass latents instead")
    if prefix.ndim != 3 or prefix.shape[0] != prompts.shape[0]:
        raise ValueError(f"{where}: the latent prefix must be (b={prompts.shape[0]}, P, dim), got {tuple(prefix.shape)}")
    return AutoregressiveWrapper(net).generate(prompts, seq_len, prepend_embeds=prefix, **kwargs)
