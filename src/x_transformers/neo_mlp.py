"""NeoMLP: an MLP whose units are tokens of a transformer (openreview A8Vuf2e8y6).

Every input feature, hidden unit and output unit is a token with a learned embedding; the input
tokens also carry their feature's value through random Fourier features. A bidirectional
:class:`~x_transformers.layers.Encoder` without positions passes messages between all of them (a
fully connected graph), and output unit j reads its token with its own weight vector:
``out_j = <t_j, w_j> + b_j``.

Legend: b batch, i inputs, u hidden units, o outputs, d model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .hub import Pretrained
from .layers import Encoder


class RandomFourierEmbed(nn.Module):
    """A scalar -> cos(2 pi (w x + c)) with a fixed random w, c (buffers: never trained)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.randn(dim))
        self.register_buffer("bias", torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:  # (...) -> (..., d)
        return torch.cos(2 * math.pi * (x[..., None] * self.weight + self.bias))


class NeoMLP(Pretrained, nn.Module):
    """``NeoMLP(dim_in=, dim_hidden=, dim_out=, dim_model=, depth=, encoder_kwargs=)``: (b, i) or
    (i,) -> (b, o) or (o,). ``encoder_kwargs`` go to the Encoder (default 4 heads of width 16)."""

    def __init__(self, *, dim_in: int, dim_hidden: int, dim_out: int, dim_model: int, depth: int,
                 encoder_kwargs: dict | None = None):
        super().__init__()
        for name, value in dict(dim_in=dim_in, dim_hidden=dim_hidden, dim_out=dim_out, dim_model=dim_model,
                                depth=depth).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NeoMLP: {name} must be an integer >= 1, got {value!r}")
        self.dim_in, self.dim_out = dim_in, dim_out
        self.input_embed = nn.Parameter(torch.randn(dim_in, dim_model) * 0.02)
        self.hidden_embed = nn.Parameter(torch.randn(dim_hidden, dim_model) * 0.02)
        self.output_embed = nn.Parameter(torch.randn(dim_out, dim_model) * 0.02)
        self.fourier = RandomFourierEmbed(dim_model)
        self.fourier_proj = nn.Linear(dim_model, dim_model)
        kwargs = dict(heads=4, attn_dim_head=16) if encoder_kwargs is None else dict(encoder_kwargs)
        self.transformer = Encoder(dim_model, depth, **kwargs)
        self.to_output_weights = nn.Parameter(torch.randn(dim_out, dim_model) * dim_model ** -0.5)
        self.to_output_bias = nn.Parameter(torch.zeros(dim_out))

    def forward(self, x: Tensor, return_embeds: bool = False):
        """x (b, i) or (i,) floats -> (b, o) or (o,); with ``return_embeds`` also the encoder's
        (input, hidden, output) token states, (b, i | u | o, d) each."""
        unbatched = x.ndim == 1
        x = x[None] if unbatched else x
        if x.ndim != 2 or x.shape[-1] != self.dim_in:
            raise ValueError(f"NeoMLP expects (batch, {self.dim_in}) or ({self.dim_in},) inputs, got {tuple(x.shape)}")
        b = x.shape[0]
        inputs = self.fourier_proj(self.fourier(x)) + self.input_embed  # (b, i, d)
        hidden = self.hidden_embed.expand(b, -1, -1)
        outputs = self.output_embed.expand(b, -1, -1)
        tokens = self.transformer(torch.cat((inputs, hidden, outputs), dim=1))  # (b, i + u + o, d)
        sizes = (inputs.shape[1], hidden.shape[1], outputs.shape[1])
        inputs, hidden, outputs = tokens.split(sizes, dim=1)
        out = (outputs * self.to_output_weights).sum(dim=-1) + self.to_output_bias  # (b, o)
        out = out[0] if unbatched else out
        return (out, (inputs, hidden, outputs)) if return_embeds else out
