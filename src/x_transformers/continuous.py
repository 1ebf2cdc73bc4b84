"""Continuous inputs and outputs: ``ContinuousTransformerWrapper`` (vectors in, vectors out, the
token wrapper's positions, memory tokens and masks) and ``ContinuousAutoregressiveWrapper``
(next-frame regression: MSE, L1 or a Gaussian negative log-likelihood; ``generate`` of frames
with the key/value cache).

Legend: b batch, n frames, M memory tokens, P prepended embeddings, d model dim,
i input width (dim_in), o output width (dim_out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import conflicts
from .hub import Pretrained
from .cache import Intermediates, KVCache
from .checks import check_dtype, check_finite, check_not_empty
from .config import _positive_int, _probability, build, check_types
from .layers import AttentionLayers, check_mask, default_positions
from .norms import LayerNorm
from .positional import AbsolutePositionalEmbedding, SinusoidalPositionalEmbedding, check_cache_reach


@dataclass(frozen=True, kw_only=True)
class ContinuousConfig:
    """``ContinuousTransformerWrapper``'s keywords (the stack is passed built, as ``attn_layers``;
    ``project_in`` / ``project_out`` modules are passed beside it)."""

    max_seq_len: int | None = None  # needed by learned absolute positions
    dim_in: int | None = None  # input width, projected to dim (no projection when None)
    dim_out: int | None = None  # output width (no projection when None: returns dim)
    num_memory_tokens: int = 0  # Memory Transformer, 2006.11527
    post_emb_norm: bool = False  # a LayerNorm after the input projection and positions
    emb_dropout: float = 0.0
    use_abs_pos_emb: bool = True  # learned absolute positions, unless the stack carries positions
    scaled_sinu_pos_emb: bool = False  # sinusoidal table with a learned scale, instead of learned
    average_pool_embed: bool = False  # mean over the (kept) frames: (b, n, d) -> (b, d) before the output
    probabilistic: bool = False  # outputs a Gaussian per frame: mean and variance (b, n, o) each
    use_identity_if_same_dim: bool = False  # no projection when dim_in / dim_out equal dim

    def __post_init__(self):
        check_types(ContinuousConfig, {f: getattr(self, f) for f in self.__dataclass_fields__})
        _positive_int("max_seq_len", self.max_seq_len, allow_none=True)
        _positive_int("dim_in", self.dim_in, allow_none=True)
        _positive_int("dim_out", self.dim_out, allow_none=True)
        _positive_int("num_memory_tokens", self.num_memory_tokens, allow_zero=True)
        _probability("emb_dropout", self.emb_dropout)
        if self.probabilistic and self.dim_out is None:
            raise ValueError("probabilistic=True needs dim_out, the width of the predicted mean and variance")


class ContinuousTransformerWrapper(Pretrained, nn.Module):
    """Vectors (b, n, i) -> vectors (b, n, o): an input projection, positions, optional memory
    tokens, a layer stack and an output projection. ``probabilistic=True`` returns the stacked
    mean and variance (2, b, n, o)."""

    def __init__(self, *, attn_layers: AttentionLayers, project_in: nn.Module | None = None,
                 project_out: nn.Module | None = None, num_memory_tokens: int | None = None, **kwargs):
        super().__init__()
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(f"attn_layers must be an Encoder, Decoder or AttentionLayers, got {type(attn_layers).__name__}")
        kwargs["num_memory_tokens"] = num_memory_tokens or 0  # upstream's default is None
        self.cfg = cfg = build(ContinuousConfig, kwargs, "ContinuousTransformerWrapper")
        from .wrappers import memory_token_count, stack_settings  # the wrapper entries of the table hold here too
        settings = stack_settings(attn_layers)
        conflicts.check("wrapper", {**settings, **kwargs})
        for given, module, name in ((cfg.dim_in, project_in, "in"), (cfg.dim_out, project_out, "out")):
            if given is not None and module is not None:
                raise ValueError(f"pass dim_{name} or project_{name}, not both: project_{name} already fixes the width")
        if cfg.probabilistic and project_out is not None:
            raise ValueError("probabilistic=True builds its own output projection (mean and log-variance); "
                             "drop project_out and pass dim_out")
        dim = attn_layers.dim
        self.attn_layers = attn_layers
        self.max_seq_len = cfg.max_seq_len
        self.num_memory_tokens = M = memory_token_count(settings, cfg.num_memory_tokens)
        self.probabilistic = cfg.probabilistic

        def linear(d_in, d_out):
            same = cfg.use_identity_if_same_dim and d_in == d_out
            return nn.Identity() if same else nn.Linear(d_in, d_out, bias=False)

        self.project_in = project_in or (linear(cfg.dim_in, dim) if cfg.dim_in is not None else nn.Identity())
        out_width = None if cfg.dim_out is None else cfg.dim_out * (2 if cfg.probabilistic else 1)
        self.project_out = project_out or (linear(dim, out_width) if out_width is not None else nn.Identity())

        # positions as in TransformerWrapper: learned unless the stack carries relative positions
        self.pos_emb = None
        if cfg.scaled_sinu_pos_emb:
            self.pos_emb = SinusoidalPositionalEmbedding(dim, scaled=True)
        elif cfg.use_abs_pos_emb and not attn_layers.layer_cfg.has_positions and cfg.max_seq_len is not None:
            self.pos_emb = AbsolutePositionalEmbedding(dim, cfg.max_seq_len)
        self.post_emb_norm = LayerNorm(dim, bias=False) if cfg.post_emb_norm else None  # bias-less, as upstream's
        self.emb_dropout = nn.Dropout(cfg.emb_dropout) if cfg.emb_dropout > 0 else nn.Identity()
        self.memory_tokens = nn.Parameter(torch.randn(M, dim) * 0.02) if M else None
        # under TUPE's untied [CLS] the memory tokens share position 0 with it and the frames keep their
        # positions (the first frame is the [CLS]), as in TransformerWrapper
        lcfg = attn_layers.layer_cfg
        self.memory_shift = 0 if (M and lcfg.tupe and lcfg.tupe_untie_cls) else M

    @property
    def dim_in(self) -> int | None:
        return self.cfg.dim_in

    def check_inputs(self, x: Tensor, mask: Tensor | None):
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating point tensor of shape (batch, seq, features), got {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"x must have shape (batch, seq, features), got {tuple(x.shape)}")
        width = self.cfg.dim_in or (self.attn_layers.dim if isinstance(self.project_in, nn.Identity) else None)
        if width is not None and x.shape[-1] != width:
            raise ValueError(f"x has {x.shape[-1]} features per frame but this wrapper takes {width} (dim_in)")
        check_not_empty(x, "x")
        check_mask(mask, x.shape[0], x.shape[1])
        check_finite(x, "x")

    def forward(self, x: Tensor, mask: Tensor | None = None, *, lens: Tensor | None = None,
                return_embeddings: bool = False, return_attn: bool = False, context=None, context_mask=None,
                cache: KVCache | None = None, sum_embeds: Tensor | None = None, prepend_embeds: Tensor | None = None,
                prepend_mask: Tensor | None = None, condition: Tensor | None = None,
                return_intermediates: bool = False, input_not_include_cache: bool | None = None):
        """x (b, n, i) -> (b, n, o) (or (2, b, n, o) mean and variance when probabilistic; (b, o)
        with average_pool_embed; the hidden states (b, n, d) with ``return_embeddings``).

        mask (b, n) bool, True = keep, or ``lens`` (b,) kept lengths (right padding).
        ``sum_embeds`` (b, n, d) is added to the input embeddings; ``prepend_embeds`` (b, P, d)
        is put before them (PaLI-style prefixes), with ``prepend_mask`` (b, P).
        ``cache`` (a KVCache, causal stacks only) decodes incrementally: x holds the new frames.
        Upstream's way: ``return_intermediates=True`` also returns an :class:`Intermediates` whose
        cache a later call takes as ``cache=``, with x the whole sequence so far (its first
        ``cache_length`` frames dropped here) or, with ``input_not_include_cache=True``, the new frames.
        """
        if lens is not None:
            if mask is not None:
                raise ValueError("pass mask or lens, not both")
            mask = torch.arange(x.shape[1], device=x.device)[None] < lens.to(x.device)[:, None]
        self.check_inputs(x, mask)
        cache, offset, x, mask, sum_embeds = self._resolve_cache(cache, x, mask, sum_embeds, input_not_include_cache,
                                                                 return_intermediates and prepend_embeds is None)
        b, n, _ = x.shape
        M, P = self.num_memory_tokens, 0
        first = cache is None or cache.empty
        if prepend_embeds is not None:
            if cache is not None:
                raise ValueError("prepend_embeds cannot be combined with a cache yet; run without cache")
            if prepend_embeds.ndim != 3 or prepend_embeds.shape[0] != b or prepend_embeds.shape[-1] != self.attn_layers.dim:
                raise ValueError(f"prepend_embeds must have shape ({b}, P, {self.attn_layers.dim}), "
                                 f"got {tuple(prepend_embeds.shape)}")
            P = prepend_embeds.shape[1]
            check_mask(prepend_mask, b, P, "prepend_mask")
        elif prepend_mask is not None:
            raise ValueError("prepend_mask was given without prepend_embeds")

        start = None
        if not first:  # frames are counted without memory tokens, as in TransformerWrapper
            start = cache.next_positions() - self.memory_shift
        positions = default_positions(mask, n, x.device, start)  # (b|1, n)

        h = self.project_in(x)
        check_dtype(h, self.attn_layers, "the projected x")
        if self.pos_emb is not None:
            if self.max_seq_len is not None and not torch.compiler.is_compiling():
                last = int(positions.max().item()) + 1
                if last > self.max_seq_len:
                    raise ValueError(f"sequence length {last} exceeds max_seq_len ({self.max_seq_len}) of the "
                                     f"absolute position embedding; shorten the input or raise max_seq_len")
            h = h + self.pos_emb(positions).to(h.dtype)
        if sum_embeds is not None:
            h = h + sum_embeds
        if self.post_emb_norm is not None:
            h = self.post_emb_norm(h)

        # layer positions: memory tokens 0..M-1, prefix M..M+P-1, frames after (counting kept ones);
        # under TUPE's untied [CLS]: memory tokens all at 0, the rest as without them
        shift = self.memory_shift
        layer_positions = positions + shift
        if P:
            kept = prepend_mask if prepend_mask is not None else torch.ones(b, P, dtype=torch.bool, device=x.device)
            pre_pos = default_positions(kept, P, x.device) + shift
            frame_pos = layer_positions.expand(b, -1) + kept.sum(-1, keepdim=True)  # after the kept prefix
            layer_positions = torch.cat((pre_pos.expand(b, -1), frame_pos), dim=-1)
            h = torch.cat((prepend_embeds.to(h.dtype), h), dim=1)
            if mask is not None or prepend_mask is not None:
                frames = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
                mask = torch.cat((kept, frames), dim=-1)
        if M and first:
            h = torch.cat((self.memory_tokens.to(h.dtype).expand(b, -1, -1), h), dim=1)
            mem_pos = torch.arange(M, device=x.device)[None].expand(layer_positions.shape[0], -1) * (shift > 0)
            layer_positions = torch.cat((mem_pos, layer_positions), dim=-1)
            if mask is not None:
                mask = torch.cat((torch.ones(b, M, dtype=torch.bool, device=x.device), mask), dim=-1)
        h = self.emb_dropout(h)

        out = self.attn_layers(h, mask, context, context_mask, positions=layer_positions, cache=cache,
                               return_attn=return_attn, **({"condition": condition} if condition is not None else {}))
        out, attns = out if return_attn else (out, None)
        if first:
            out = out[:, M + P:]  # memory tokens and the prefix are not frames

        if self.cfg.average_pool_embed:
            frames = mask[:, -n:] if mask is not None else None
            out = masked_mean(out, frames)  # (b, d)
        if not return_embeddings:
            out = self.project_out(out)
            if self.probabilistic:
                mean, log_var = out.unflatten(-1, (-1, 2)).unbind(-1)  # interleaved, as upstream
                out = torch.stack((mean, log_var.exp()))  # (2, b, n, o)
        if return_intermediates:
            inter = Intermediates(cache=cache, cache_length=offset + n, attn_maps=attns)
            return out, inter
        return (out, attns) if return_attn else out

    def _resolve_cache(self, cache, x, mask, sum_embeds, input_not_include_cache, build: bool):
        """-> (the KVCache to run with, frames already in it, the new frames, their mask and sum_embeds).
        An Intermediates is copied (functional calls, as upstream); without ``input_not_include_cache``
        its x holds the whole sequence so far. ``build``: intermediates wanted, so a causal stack fills
        a fresh cache."""
        if cache is None:
            if input_not_include_cache:
                raise ValueError("input_not_include_cache=True needs cache=")
            return (KVCache() if build and self.attn_layers.causal else None), 0, x, mask, sum_embeds
        if isinstance(cache, KVCache):
            if input_not_include_cache is False:
                raise ValueError("input_not_include_cache=False with a KVCache: x holds only the new frames here; "
                                 "pass an Intermediates (from return_intermediates=True) for upstream's convention")
            return cache, cache.seq_len - (self.num_memory_tokens if not cache.empty else 0), x, mask, sum_embeds
        if not isinstance(cache, Intermediates):
            raise TypeError(f"cache must be a KVCache or the Intermediates of return_intermediates=True, "
                            f"got {type(cache).__name__}")
        kv, offset, start = cache.resume(x.shape[1], input_not_include_cache, unit="frames")
        if start:
            x = x[:, start:]
            mask = None if mask is None else mask[:, start:]
            sum_embeds = None if sum_embeds is None else sum_embeds[:, start:]
        return kv, offset, x, mask, sum_embeds


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """(b, n, d), (b, n) bool -> (b, d): the mean over kept frames (zeros for a row with none)."""
    if mask is None:
        return x.mean(dim=1)
    w = mask.to(x.dtype)[..., None]
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)


class GaussianNLL(nn.Module):
    """Per-element Gaussian negative log-likelihood of ``target`` under ``pred = (mean, variance)``."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        mean, var = pred
        return F.gaussian_nll_loss(mean, target, var, reduction="none")


class ContinuousAutoregressiveWrapper(Pretrained, nn.Module):
    """Next-frame prediction around a causal ``ContinuousTransformerWrapper``: ``forward(x)`` is
    the loss of predicting x[:, 1:] from x[:, :-1]; ``generate`` continues a sequence of frames."""

    def __init__(self, net: ContinuousTransformerWrapper, loss_fn: nn.Module | None = None, use_l1_loss: bool = False,
                 equal_loss_weight_batch: bool = False):
        """``loss_fn`` maps (prediction, target) to an unreduced loss; the default is MSE (L1 with
        ``use_l1_loss``; the Gaussian NLL when the net is probabilistic). ``equal_loss_weight_batch``:
        with a mask, each sequence weighs the same (not each frame)."""
        super().__init__()
        if not isinstance(net, ContinuousTransformerWrapper):
            raise TypeError(f"net must be a ContinuousTransformerWrapper, got {type(net).__name__}")
        for name, value in (("use_l1_loss", use_l1_loss), ("equal_loss_weight_batch", equal_loss_weight_batch)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if net.probabilistic and use_l1_loss:
            raise ValueError("use_l1_loss and a probabilistic net conflict: a probabilistic net is trained by its "
                             "Gaussian negative log-likelihood")
        if net.cfg.average_pool_embed:
            raise ValueError("next-frame prediction needs one output per frame; the net has average_pool_embed=True")
        self.net = net
        self.max_seq_len = net.max_seq_len
        self.probabilistic = net.probabilistic
        if loss_fn is None:
            loss_fn = GaussianNLL() if net.probabilistic else nn.L1Loss(reduction="none") if use_l1_loss \
                else nn.MSELoss(reduction="none")
        self.loss_fn = loss_fn
        self.equal_loss_weight_batch = equal_loss_weight_batch

    def forward(self, x: Tensor, mask: Tensor | None = None, *, lens: Tensor | None = None, rollout_steps: int = 1,
                **kwargs) -> Tensor:
        """x (b, n, i) -> the mean next-frame loss over kept frames (mask / lens over x's n frames).

        ``rollout_steps`` k > 1 (upstream's; V-JEPA 2-AC's rollout loss, 2506.09985): per row a
        random context of s >= 1 frames (s uniform in 1..len - k), then k frames predicted
        autoregressively, each fed back as the next input (sampled, reparameterised, when
        probabilistic; gradients flow through the rollout), against x[s:s+k]; rows shorter than
        k + 1 frames are left out. The mask must be right padding (lengths)."""
        if x.ndim != 3 or x.shape[1] < 2:
            raise ValueError(f"x must be (batch, seq >= 2, features) to predict next frames, got {tuple(x.shape)}")
        if isinstance(rollout_steps, bool) or not isinstance(rollout_steps, int) or rollout_steps < 1:
            raise ValueError(f"rollout_steps must be an integer >= 1, got {rollout_steps!r}")
        if lens is not None:
            if mask is not None:
                raise ValueError("pass mask or lens, not both")
            mask = torch.arange(x.shape[1], device=x.device)[None] < lens.to(x.device)[:, None]
        if rollout_steps > 1:
            return self._rollout_loss(x, mask, rollout_steps, kwargs)
        inp, target = x[:, :-1], x[:, 1:]
        if mask is not None:
            check_mask(mask, x.shape[0], x.shape[1])
            # a prediction counts when both its input frame and its target frame are kept
            in_mask, loss_mask = mask[:, :-1], mask[:, :-1] & mask[:, 1:]
        else:
            in_mask = loss_mask = None
        out = self.net(inp, in_mask, **kwargs)
        loss = self.loss_fn(out, target)
        if loss_mask is None:
            return loss.mean()
        if loss.ndim < 2:
            raise ValueError("with a mask, loss_fn must return an unreduced loss (reduction='none')")
        if self.equal_loss_weight_batch:  # each sequence's mean over its kept frames, then the batch mean
            per_row = (loss * loss_mask[..., None]).sum(dim=(1, 2)) / (loss_mask.sum(-1) * loss.shape[-1]).clamp(min=1)
            return per_row.mean()
        return loss[loss_mask].mean()

    def _rollout_loss(self, x: Tensor, mask: Tensor | None, k: int, kwargs) -> Tensor:
        """The rollout loss of ``forward(rollout_steps=k)``."""
        if "prepend_embeds" in kwargs or "cache" in kwargs:
            raise ValueError("rollout_steps > 1 builds its own left-padded contexts: no prepend_embeds or cache")
        if mask is not None:
            check_mask(mask, x.shape[0], x.shape[1])
            lengths = mask.sum(dim=-1)
            if not torch.equal(mask, torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None]):
                raise ValueError("rollout_steps > 1 needs right padding: the mask must keep each row's first frames")
        else:
            lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
        width = self.net.cfg.dim_out or self.net.attn_layers.dim
        if width != x.shape[-1]:
            raise ValueError(f"rollout_steps > 1 feeds each prediction back as an input: the net's output width "
                             f"({width}) must equal the frames' ({x.shape[-1]})")
        rows = (lengths >= k + 1).nonzero().squeeze(-1)
        if rows.numel() == 0:
            raise ValueError(f"rollout_steps={k}: no row has the {k + 1} frames a context of one frame and {k} "
                             f"targets need (longest: {int(lengths.max())})")
        # per-row inputs (context, its mask, condition) follow the rows kept
        kwargs = {key: value[rows] if isinstance(value, Tensor) and value.shape[:1] == x.shape[:1] else value
                  for key, value in kwargs.items()}
        x, lengths = x[rows], lengths[rows]
        # s: frames of context per row, uniform in 1 .. length - k
        starts = 1 + (torch.rand(x.shape[0], device=x.device) * (lengths - k)).long()
        width, cols = int(starts.max()), torch.arange(x.shape[1], device=x.device)
        # each row's context right-aligned (left padding, masked): frame j of the row at column width - s + j
        src = (cols[:width][None] - width + starts[:, None]).clamp(min=0)  # (b, width)
        seq = x.gather(1, src[..., None].expand(-1, -1, x.shape[-1]))
        seq_mask = cols[:width][None] >= (width - starts)[:, None]
        target_idx = starts[:, None] + torch.arange(k, device=x.device)[None]  # (b, k)
        targets = x.gather(1, target_idx[..., None].expand(-1, -1, x.shape[-1]))
        preds = []
        for _ in range(k):
            last = self.net(seq, seq_mask, **kwargs)[..., -1:, :]  # (b, 1, o) or (2, b, 1, o)
            preds.append(last)
            frame = last
            if self.probabilistic:  # a reparameterised draw: the rollout stays differentiable
                mean, var = last
                frame = mean + var.clamp(min=1e-5).sqrt() * torch.randn_like(mean)
            seq = torch.cat((seq, frame), dim=1)
            seq_mask = F.pad(seq_mask, (0, 1), value=True)
        return self.loss_fn(torch.cat(preds, dim=-2), targets).mean()

    def _next_frame(self, out: Tensor, temperature: float, generator) -> Tensor:
        last = out[..., -1:, :]  # (b, 1, o) or (2, b, 1, o)
        if not self.probabilistic:
            return last
        mean, var = last
        if temperature == 0:
            return mean
        std = var.clamp(min=1e-5).sqrt() * temperature
        return mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)

    @staticmethod
    def _check_width(frame: Tensor, x: Tensor):
        if frame.shape[-1] != x.shape[-1]:
            raise ValueError(f"generated frames have {frame.shape[-1]} features but the net takes {x.shape[-1]}: "
                             f"generation feeds each output back as the next input, so dim_out must equal dim_in")

    @torch.no_grad()
    def generate(self, start_tokens: Tensor, seq_len: int, temperature: float = 1.0, cache_kv: bool = True, *,
                 generator: torch.Generator | None = None, **kwargs) -> Tensor:
        """Continue ``start_tokens`` (b, n, i) or (n, i) by ``seq_len`` frames -> (b, seq_len, o)
        (or (seq_len, o)). A probabilistic net samples each frame from its Gaussian (variance
        scaled by ``temperature``; 0 takes the mean). ``cache_kv`` decodes with the key/value cache,
        one frame per step; otherwise each step reruns the whole sequence (the last max_seq_len
        frames). ``kwargs`` go to the net (e.g. context)."""
        _positive_int("seq_len", seq_len)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        no_batch = start_tokens.ndim == 2
        x = start_tokens[None] if no_batch else start_tokens
        if x.ndim != 3:
            raise ValueError(f"start_tokens must be (batch, seq, features) or (seq, features), "
                             f"got {tuple(start_tokens.shape)}")
        if cache_kv and not self.net.attn_layers.causal:
            raise ValueError("cache_kv=True needs a causal stack (Decoder); pass cache_kv=False for a bidirectional one")
        if cache_kv:  # x.shape[1] + seq_len - 1: the most frames the net ever sees at once
            check_cache_reach(self.net.pos_emb, self.max_seq_len, x.shape[1] + seq_len - 1, "frames")

        was_training = self.net.training
        self.net.eval()
        try:
            out = x
            if cache_kv:
                cache = KVCache()
                step_in = x
                for _ in range(seq_len):
                    frame = self._next_frame(self.net(step_in, cache=cache, **kwargs), temperature, generator)
                    self._check_width(frame, x)
                    out = torch.cat((out, frame), dim=1)
                    step_in = frame
            else:
                for _ in range(seq_len):
                    window = out if self.max_seq_len is None else out[:, -self.max_seq_len:]
                    frame = self._next_frame(self.net(window, **kwargs), temperature, generator)
                    self._check_width(frame, x)
                    out = torch.cat((out, frame), dim=1)
        finally:
            self.net.train(was_training)
        out = out[:, x.shape[1]:]
        return out[0] if no_batch else out
