"""Vision Transformer (An Image is Worth 16x16 Words, 2010.11929): images cut into patches, each
patch embedded like a token, an :class:`~x_transformers.layers.Encoder` over them, then a mean
pooled classification head (or the patch embeddings).

Legend: b batch, c channels, H W image height / width, p patch side, h w patches per column / row,
N = h * w patches, R register tokens, d model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .hub import Pretrained
from .config import _positive_int, _probability, build, check_types
from .layers import AttentionLayers
from .norms import LayerNorm


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """``ViTransformerWrapper``'s keywords (the Encoder is passed built, as ``attn_layers``)."""

    image_size: int | tuple  # side of a square image, or (height, width)
    patch_size: int  # side of a square patch; must divide the image's sides
    channels: int = 3
    num_classes: int | None = None  # None: no head, forward returns the patch embeddings
    post_emb_norm: bool = False  # a LayerNorm after patch + position embedding
    num_register_tokens: int = 0  # Vision Transformers Need Registers, 2309.16588
    emb_dropout: float = 0.0

    def __post_init__(self):
        check_types(ViTConfig, {k: getattr(self, k) for k in ("channels", "num_classes", "post_emb_norm",
                                                              "num_register_tokens", "emb_dropout")})
        _positive_int("patch_size", self.patch_size)
        _positive_int("channels", self.channels)
        _positive_int("num_classes", self.num_classes, allow_none=True)
        _positive_int("num_register_tokens", self.num_register_tokens, allow_zero=True)
        _probability("emb_dropout", self.emb_dropout)
        height, width = self.image_hw
        for side, name in ((height, "height"), (width, "width")):
            if side % self.patch_size:
                raise ValueError(f"image {name} {side} is not divisible by patch_size {self.patch_size}; "
                                 f"resize the images or pick a patch_size that divides {side}")

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.image_size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            size = tuple(size)
        elif not isinstance(size, tuple):
            size = (size, size)
        if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
            raise ValueError(f"image_size must be a positive integer or a (height, width) pair, got {self.image_size!r}")
        return size


def patchify(img: Tensor, patch_size: int) -> Tensor:
    """(b, c, H, W) -> (b, N, p * p * c): patches in row-major order (left to right, then down);
    inside a patch its pixels row-major, each pixel's channels last (upstream's patch layout)."""
    b, c, H, W = img.shape
    p = patch_size
    x = img.reshape(b, c, H // p, p, W // p, p)  # (b, c, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (b, h, w, p, p, c)
    return x.reshape(b, (H // p) * (W // p), p * p * c)


class ViTransformerWrapper(Pretrained, nn.Module):
    """Image (b, c, H, W) -> class logits (b, num_classes), or patch embeddings (b, N, d)."""

    def __init__(self, *, attn_layers: AttentionLayers, **kwargs):
        super().__init__()
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"attn_layers must be an Encoder, got {type(attn_layers).__name__}")
        if attn_layers.causal:
            raise ValueError("a ViT sees the whole image at once: attn_layers must be an Encoder, not a Decoder")
        if attn_layers.needs_context:
            raise ValueError("attn_layers has cross-attention, but a ViT has no context to attend to; "
                             "drop cross_attend")
        for required in ("image_size", "patch_size"):
            if required not in kwargs:
                raise TypeError(f"ViTransformerWrapper needs {required}")
        self.cfg = cfg = build(ViTConfig, kwargs, "ViTransformerWrapper")
        dim = attn_layers.dim
        height, width = cfg.image_hw
        self.image_hw = (height, width)
        self.patch_size = p = cfg.patch_size
        self.channels = cfg.channels
        self.num_patches = num_patches = (height // p) * (width // p)
        patch_dim = cfg.channels * p * p

        # LayerNorm on the raw patch and on its embedding (as upstream; bias-less norms, as upstream's)
        self.patch_to_embedding = nn.Sequential(LayerNorm(patch_dim, bias=False), nn.Linear(patch_dim, dim),
                                                LayerNorm(dim, bias=False))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, dim))
        # registers carry no position: they are appended after the patches and dropped before pooling
        R = cfg.num_register_tokens
        self.register_tokens = nn.Parameter(torch.randn(R, dim)) if R else None
        self.post_emb_norm = LayerNorm(dim, bias=False) if cfg.post_emb_norm else None
        self.dropout = nn.Dropout(cfg.emb_dropout) if cfg.emb_dropout > 0 else nn.Identity()
        self.attn_layers = attn_layers
        self.mlp_head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes is not None else None

    def check_image(self, img: Tensor):
        want = (self.channels, *self.image_hw)
        if img.ndim != 4 or tuple(img.shape[1:]) != want:
            raise ValueError(f"expected images of shape (batch, {want[0]}, {want[1]}, {want[2]}) "
                             f"(channels={self.channels}, image_size={self.cfg.image_size}), got {tuple(img.shape)}")
        if not img.is_floating_point():
            raise ValueError(f"images must be a floating point tensor, got {img.dtype}")
        if img.shape[0] == 0:
            raise ValueError("images has an empty batch; pass at least one image")

    def forward(self, img: Tensor, return_embeddings: bool = False, return_logits_and_embeddings: bool = False):
        """img (b, c, H, W) -> logits (b, num_classes); the patch embeddings (b, N, d) with
        ``return_embeddings`` or without a head; both with ``return_logits_and_embeddings``."""
        if return_embeddings and return_logits_and_embeddings:
            raise ValueError("pass at most one of return_embeddings and return_logits_and_embeddings")
        self.check_image(img)
        b = img.shape[0]
        x = self.patch_to_embedding(patchify(img, self.patch_size))  # (b, N, d)
        x = x + self.pos_embedding
        if self.post_emb_norm is not None:
            x = self.post_emb_norm(x)
        x = self.dropout(x)
        if self.register_tokens is not None:
            x = torch.cat((x, self.register_tokens.to(x.dtype).expand(b, -1, -1)), dim=1)  # (b, N + R, d)

        embed = self.attn_layers(x)[:, :self.num_patches]  # registers never reach the head directly
        if self.mlp_head is None or return_embeddings:
            return embed
        logits = self.mlp_head(embed.mean(dim=1))  # (b, num_classes)
        return (logits, embed) if return_logits_and_embeddings else logits
