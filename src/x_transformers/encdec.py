"""The encoder-decoder ``XTransformer``: two :class:`~x_transformers.wrappers.TransformerWrapper`
sides, the decoder cross-attending to the encoder's hidden states (the encoder has no output head).
"""

from __future__ import annotations

import torch
from torch import nn

from . import aliases, conflicts
from .config import REQUIRES, WRAPPER_KEYS
from .funnel import DEFAULT_DEPTHS, FunnelEncoder
from .heads import POOLING
from .hub import Pretrained
from .layers import Decoder, Encoder
from .wrappers import MODULE_KEYS, TransformerWrapper


HEAD_KEYS = ("tie_embedding", "logits_dim", "logits_scale")  # the output head's keywords


def resolve_prefixed(kwargs: dict) -> dict:
    """XTransformer's keywords with upstream names resolved (aliases.py), shared and per side:
    ``enc_attn_one_kv_head=True`` -> ``enc_attn_kv_heads=1``."""
    groups = {"": {}, "enc_": {}, "dec_": {}}
    for key, value in kwargs.items():
        prefix = key[:4] if key[:4] in ("enc_", "dec_") else ""
        groups[prefix][key[len(prefix):]] = value
    out = {}
    for prefix, group in groups.items():
        resolved = aliases.resolve(group, ("layers", "wrapper", "xtransformer"), "XTransformer", prefix)
        out.update({prefix + k: v for k, v in resolved.items()})
    return out


class XTransformer(Pretrained, nn.Module):
    """Encoder-decoder. Shared keywords (``num_tokens, dim, depth, heads, max_seq_len`` and any
    other model keyword) apply to both sides; ``enc_*`` / ``dec_*`` keywords to one side only and
    win over shared ones. ``tie_token_emb=True`` shares the token embedding of both sides.

    ``forward(src, tgt)`` returns the decoder's logits; with ``return_loss=True`` it returns
    upstream's value instead, the mean next-token cross-entropy of ``tgt`` (``tgt[:, 1:]`` predicted
    from ``tgt[:, :-1]``; targets equal to ``ignore_index`` do not count, such inputs are fed as
    ``pad_value``), as :class:`AutoregressiveWrapper` computes it (fused with the head)."""

    def __init__(self, *, dim: int, tie_token_emb: bool = False, return_loss: bool = False, ignore_index: int = -100,
                 pad_value: int = 0, **kwargs):
        super().__init__()
        if not isinstance(tie_token_emb, bool):
            raise ValueError(f"tie_token_emb must be True or False, got {tie_token_emb!r}")
        if not isinstance(return_loss, bool):
            raise ValueError(f"return_loss must be True or False, got {return_loss!r}")
        if not return_loss and (ignore_index != -100 or pad_value != 0):
            key = "ignore_index" if ignore_index != -100 else "pad_value"
            raise ValueError(f"XTransformer: {key} applies to the loss, which forward returns only with "
                             f"return_loss=True (without it, forward returns logits)")
        kwargs = resolve_prefixed(kwargs)
        conflicts.check("xtransformer", dict(dim=dim, tie_token_emb=tie_token_emb, **kwargs))
        shared, sides = {}, {"enc": {}, "dec": {}}
        for key, value in kwargs.items():
            prefix = key.split("_", 1)[0]
            if prefix in sides and "_" in key:
                sides[prefix][key.split("_", 1)[1]] = value
            else:
                shared[key] = value
        # the encoder's hidden states feed the decoder: it has no output head, so the head keywords
        # are the decoder's (enc_tie_embedding is accepted: tied or not, there is no head)
        enc = {k: v for k, v in shared.items() if k not in HEAD_KEYS}
        enc.update({k: v for k, v in sides["enc"].items() if k != "tie_embedding"}, return_only_embed=True)
        dec = {**shared, **sides["dec"]}
        dec.pop("cross_attend", None)
        if "cross_attn_tokens_dropout" in shared and "cross_attn_tokens_dropout" not in sides["enc"]:
            enc.pop("cross_attn_tokens_dropout")  # upstream's own keyword: it drops encoder tokens for the decoder
        for mine, other, own in ((enc, dec, sides["enc"]), (dec, enc, sides["dec"])):
            # a shared sub-keyword (rotary_base) serves the side whose feature is on
            for sub, feature in REQUIRES.items():
                if sub in mine and sub not in own and mine.get(feature) is not True and other.get(feature) is True:
                    mine.pop(sub)
        enc_cls = Encoder
        if enc.pop("funnel", False):  # Funnel Transformer encoder (2006.03236), enc_depths per block
            conflicts.check("funnel", enc)
            enc["depth"], enc_cls = enc.pop("depths", DEFAULT_DEPTHS), FunnelEncoder
        self.encoder = self._side(enc_cls, dim, enc, "XTransformer (encoder)")
        self.decoder = self._side(Decoder, dim, dec, "XTransformer (decoder)", cross_attend=True)
        if tie_token_emb:  # same shape: the conflict table compared num_tokens and emb_dim
            self.decoder.token_emb = self.encoder.token_emb
        self.return_loss = return_loss
        if return_loss:  # kept outside the module tree: its only module is self.decoder
            from .autoregressive import AutoregressiveWrapper
            self.__dict__["_loss"] = AutoregressiveWrapper(self.decoder, ignore_index=ignore_index, pad_value=pad_value)

    @staticmethod
    def _side(layers_cls, dim, kwargs, where, **extra):
        wrapper = {k: kwargs.pop(k) for k in list(kwargs) if k in WRAPPER_KEYS or k in MODULE_KEYS}
        for key in (*POOLING, "embed_num_tokens"):
            if wrapper.get(key):
                raise ValueError(f"{where}: {key} is not for an encoder-decoder (the encoder's hidden states feed "
                                 f"cross-attention per token; the decoder's forward takes no embed_ids); build the "
                                 f"TransformerWrapper yourself")
        for required in ("num_tokens", "depth"):
            if required not in (wrapper if required == "num_tokens" else kwargs):
                raise TypeError(f"{where} needs {required!r} (shared, or with its enc_/dec_ prefix)")
        depth, heads = kwargs.pop("depth"), kwargs.pop("heads", 8)
        layers = layers_cls(dim, depth, heads, **kwargs, **extra)
        return TransformerWrapper(attn_layers=layers, **wrapper)

    def encode(self, src, mask=None):
        return self.encoder(src, mask, return_embeddings=True)

    def forward(self, src, tgt, mask=None, tgt_mask=None, *, return_embeddings: bool = False):
        """src (b, n_src), tgt (b, n_tgt) -> decoder logits (b, n_tgt, v) (hidden states with
        ``return_embeddings``; the loss with ``return_loss=True``). ``mask`` is the source padding
        mask, used by cross-attention; ``tgt_mask`` the target's."""
        if self.return_loss and return_embeddings:
            raise ValueError("XTransformer(return_loss=True) returns the loss: build it without return_loss for "
                             "hidden states")
        enc = self.encode(src, mask)
        if isinstance(self.encoder.attn_layers, FunnelEncoder):  # a pooled encoder has a pooled mask
            mask = self.encoder.attn_layers.output_mask(mask)
        if self.return_loss:
            return self.__dict__["_loss"](tgt, tgt_mask, context=enc, context_mask=mask)
        return self.decoder(tgt, tgt_mask, context=enc, context_mask=mask, return_embeddings=return_embeddings)

    @torch.no_grad()
    def generate(self, src, start_tokens, seq_len: int, mask=None, **kwargs):
        """Encode ``src`` once, then decode ``seq_len`` tokens after ``start_tokens`` with cached
        self-attention and cross-attention keys/values computed once. ``kwargs``: those of
        :meth:`AutoregressiveWrapper.generate` (temperature, filters, eos_token, beams, ...)."""
        from .autoregressive import AutoregressiveWrapper  # generation lives outside the model

        was_training = self.training
        self.eval()
        try:
            enc = self.encode(src, mask)
            return AutoregressiveWrapper(self.decoder).generate(start_tokens, seq_len, context=enc,
                                                                context_mask=mask, **kwargs)
        finally:
            self.train(was_training)
