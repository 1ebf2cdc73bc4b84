"""Load a checkpoint of upstream x-transformers (lucidrains, 2.31.x) into a model of this package.

Build our model with the keywords the upstream model was built with, then::

    from x_transformers.upstream import load_state_dict
    load_state_dict(model, torch.load("upstream.pt"))

The names differ (upstream ``attn_layers.layers.3.1.to_q.weight`` is our
``attn_layers.blocks.3.fn.to_q.weight``) and so do a few conventions, each converted here:

- norms: upstream stores ``gamma - 1`` (``norm_add_unit_offset=True``, its default) and has no
  LayerNorm bias (build ours with ``norm_bias=False``); its RMSNorm / ScaleNorm multiply by
  ``sqrt(dim)``, which our ScaleNorm's ``g`` carries;
- rotary: upstream rotates interleaved channel pairs (0, 1), (2, 3), ...; ours rotates the half
  split (i, i + r/2), as GPT-NeoX / Llama do. Dot products do not care about the order of
  channels, so the rows of every self-attention ``to_q`` / ``to_k`` (and the channels of its
  memory keys, which meet the same queries) are permuted;
- learned absolute positions are multiplied by ``dim ** -0.5`` upstream, T5's relative bias by
  ``dim_head ** 0.5``: folded into our tables;
- talking heads: upstream mixes the logits as ``s + W s`` (a 1x1 convolution), the weights as
  ``W a``; ours holds the (h, h) matrices ``I + W^T`` and ``W^T``;
- QK-norm: upstream's logit scale is a constant (``attn_qk_norm_scale``); ours is a learned
  per-head parameter, set here from our config (it has no tensor upstream).

Strict by default: an upstream tensor no parameter of ours takes, or a parameter of ours with no
upstream tensor, raises :class:`UpstreamCheckpointError` naming every such key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import Attention
from .feedforward import FeedForward
from .layers import AttentionLayers
from .norms import LayerNorm, RMSNorm, ScaleNorm
from .positional import AbsolutePositionalEmbedding, SinusoidalPositionalEmbedding
from .wrappers import TransformerWrapper, XTransformer

__all__ = ["load_state_dict", "convert_state_dict", "UpstreamCheckpointError"]


class UpstreamCheckpointError(ValueError):
    """The upstream state dict does not fit this model; the message names every bad key."""


@dataclass
class _Source:
    """Where one of our tensors comes from: upstream keys and how to turn them into ours.
    ``keys=()`` marks a tensor upstream does not store (derived from our own config)."""

    keys: tuple[str, ...]
    fn: Callable = lambda t: t


def _same(key):
    return _Source((key,))


class _Plan:
    """Our state-dict key -> _Source; hints say which keyword makes an unmatched tensor go away."""

    def __init__(self, unit_offset: bool):
        self.unit_offset = unit_offset
        self.sources: dict[str, _Source] = {}
        self.hints: dict[str, str] = {}
        self.checks: list[tuple[str, Callable]] = []  # upstream buffers that must hold a given value

    def add(self, ours: str, source: _Source):
        self.sources[ours] = source

    def hint(self, ours: str, why: str):
        self.hints[ours] = why


# ------------------------------------------------------------------------------------------
# per-module rules


def _norm(plan: _Plan, norm: nn.Module, ours: str, up: str, dim: int):
    off = 1.0 if plan.unit_offset else 0.0
    if isinstance(norm, LayerNorm):
        plan.add(ours + "weight", _Source((up + "gamma",), lambda g: g + off))
        if norm.bias is not None:
            plan.hint(ours + "bias", "upstream's LayerNorm has no bias: build this model with norm_bias=False")
    elif isinstance(norm, RMSNorm):
        plan.add(ours + "weight", _Source((up + "g",), lambda g: g + off))
    elif isinstance(norm, ScaleNorm):
        plan.add(ours + "g", _Source((up + "g",), lambda g: ((g + off) * dim ** 0.5).reshape(())))
    else:
        raise UpstreamCheckpointError(f"{ours[:-1]}: no upstream equivalent of {type(norm).__name__}")


def rotary_permutation(dim_head: int, rot_dim: int) -> torch.Tensor:
    """Index of upstream channels for ours: our channel j < r/2 is upstream's 2j, our r/2 + j is
    upstream's 2j + 1 (half-split pairs vs interleaved pairs); the unrotated rest stays."""
    half = rot_dim // 2
    idx = list(range(0, rot_dim, 2)) + list(range(1, rot_dim, 2)) + list(range(rot_dim, dim_head))
    assert len(idx) == dim_head and half * 2 == rot_dim
    return torch.tensor(idx)


def head_permutation(heads: int, kv_heads: int) -> torch.Tensor | None:
    """Index of upstream query heads for ours under grouped key/values: upstream's query head h
    reads kv head h % kv_heads (a repeat of the kv heads), ours reads h // (heads / kv_heads)
    (repeat_interleave, as Llama). Our head g * r + i is upstream's i * kv_heads + g."""
    if kv_heads in (1, heads):
        return None
    r = heads // kv_heads
    return torch.tensor([(j % r) * kv_heads + j // r for j in range(heads)])


def _rows(heads, head_perm=None, chan_perm=None):
    """(heads * d, in) weights: reorder the heads, then the channels within each head."""
    def fn(w):
        t = w.reshape(heads, -1, w.shape[-1])
        t = t[head_perm] if head_perm is not None else t
        t = t[:, chan_perm] if chan_perm is not None else t
        return t.reshape(w.shape)
    return fn


def _mix(head_perm, fn):
    if head_perm is None:
        return fn
    return lambda w: fn(w)[head_perm][:, head_perm]


def _attention(plan: _Plan, attn: Attention, ours: str, up: str, rot_dim: int | None):
    perm = rotary_permutation(attn.dim_head, rot_dim) if rot_dim else None
    hp = head_permutation(attn.heads, attn.kv_heads)
    plan.add(ours + "to_q.weight", _Source((up + "to_q.weight",), _rows(attn.heads, hp, perm)))
    if attn.to_k is not None:
        plan.add(ours + "to_k.weight", _Source((up + "to_k.weight",), _rows(attn.kv_heads, None, perm)))
    plan.add(ours + "to_v.weight", _same(up + "to_v.weight"))
    parts = max(1, len(attn.orthog))  # belief attention: one copy of the heads per option
    if hp is None:
        plan.add(ours + "to_out.weight", _same(up + "to_out.weight"))
    else:  # (dim, c * heads * d): its input columns follow the heads
        plan.add(ours + "to_out.weight", _Source((up + "to_out.weight",), lambda w: w.reshape(
            w.shape[0], parts, attn.heads, -1)[:, :, hp].reshape(w.shape)))
    for name in ("to_q", "to_k", "to_v", "to_out"):
        if getattr(attn, name) is not None and getattr(attn, name).bias is not None:
            plan.hint(f"{ours}{name}.bias", "upstream's attention projections have no bias: attn_bias=False")
    if attn.mem_k is not None:
        fn = (lambda t: t[..., perm]) if perm is not None else (lambda t: t)
        plan.add(ours + "mem_k", _Source((up + "mem_k",), fn))
        plan.add(ours + "mem_v", _same(up + "mem_v"))
    if attn.qk_scale is not None:
        scale = attn.cfg.qk_norm_scale
        plan.add(ours + "qk_scale", _Source((), lambda: torch.full_like(attn.qk_scale, scale)))
    if attn.pre_mix is not None:  # upstream: s + conv(s), conv weight (g, h, 1, 1) -> ours (h, g)
        plan.add(ours + "pre_mix", _Source((up + "attend.pre_softmax_talking_heads.weight",), _mix(
            hp, lambda w: torch.eye(w.shape[0], dtype=w.dtype) + w[:, :, 0, 0].t())))
    if attn.post_mix is not None:
        plan.add(ours + "post_mix", _Source((up + "attend.post_softmax_talking_heads.weight",), _mix(
            hp, lambda w: w[:, :, 0, 0].t().contiguous())))
    _content_and_hybrid(plan, attn, ours, up, perm, hp)
    return hp


def _content_and_hybrid(plan: _Plan, attn: Attention, ours: str, up: str, perm, hp):
    """CoPE, the forgetting transformer's gates and the hybrid module (data_positions.py, hybrid.py)."""
    if attn.cope is not None:  # e[p] meets the (rotated) queries: its channels follow theirs
        plan.add(ours + "cope.pos_emb", _Source((up + "attend.cope.pos_emb",),
                                                (lambda t: t[:, perm]) if perm is not None else (lambda t: t)))
        if attn.cope.mix is not None:  # a 1x1 convolution (h_out, h_in, 1, 1) -> (h_out, h_in)
            plan.add(ours + "cope.mix", _Source((up + "attend.cope.talking_heads.weight",),
                                                _mix(hp, lambda w: w[:, :, 0, 0].contiguous())))
    fb = attn.forget_bias
    if fb is not None:
        src = up + "data_dependent_alibi.to_forget_gates.0."
        if hasattr(fb, "to_qk"):  # per row: (2 * heads * d', dim) rows as (q|k, head, channel)
            plan.add(ours + "forget_bias.to_qk.weight", _Source((src + "weight",), lambda w: w if hp is None else
                                                                w.reshape(2, attn.heads, -1, w.shape[-1])[:, hp].reshape(w.shape)))
        else:  # one (or, bidirectional, two) gate per head
            heads = lambda t: t if hp is None else t.reshape(-1, attn.heads, *t.shape[1:])[:, hp].reshape(t.shape)
            plan.add(ours + "forget_bias.to_gates.weight", _Source((src + "weight",), heads))
            plan.add(ours + "forget_bias.to_gates.bias", _Source((src + "bias",), heads))
    if attn.hybrid is not None:
        if hp is not None:
            raise UpstreamCheckpointError("a hybrid module with grouped key/values cannot be loaded: upstream's query "
                                          "heads are ordered differently, and the module's output channels follow them")
        for name in attn.hybrid.module.state_dict():
            plan.add(f"{ours}hybrid.module.{name}", _same(f"{up}hybrid_module.fn.{name}"))
        for i, norm in enumerate(("out_norm", "hybrid_norm")):
            plan.add(f"{ours}hybrid.{norm}.g", _Source((f"{up}hybrid_norms.{i}.gamma",), lambda g: g + 1.0))  # (gamma + 1)
        if attn.hybrid.to_mix is not None:
            plan.add(ours + "hybrid.to_mix.weight", _same(up + "hybrid_mix.weight"))


def _feedforward(plan: _Plan, ff: FeedForward, ours: str, up: str):
    first = f"{up}ff.0.proj." if ff.glu else f"{up}ff.0.0."
    for p in ("weight", "bias"):
        if getattr(ff.proj_in, p) is not None:
            plan.add(f"{ours}proj_in.{p}", _same(first + p))
        if getattr(ff.proj_out, p) is not None:
            plan.add(f"{ours}proj_out.{p}", _same(f"{up}ff.2.{p}"))


def _layers(plan: _Plan, layers: AttentionLayers, ours: str, up: str):
    rot_dim = layers.rotary.rot_dim if layers.rotary is not None else None
    hp = None  # the query-head order under grouped key/values: the same in every layer
    for i, (spec, block) in enumerate(zip(layers.layout, layers.blocks)):
        o, u = f"{ours}blocks.{i}.", f"{up}layers.{i}."
        for name, index in (("pre_norm", 0), ("branch_norm", 1), ("post_norm", 2)):
            norm = getattr(block, name)
            if norm is not None:
                _norm(plan, norm, f"{o}{name}.", f"{u}0.{index}.", layers.dim)
        if block.gate is not None:
            plan.hint(o + "gate", "upstream has no ReZero gate (use_rezero)")
        fn_up = f"{u}1."
        if spec.kind == "f":
            if layers.cfg.macaron:  # upstream wraps macaron's half-step feed-forwards in Scale(0.5, ff)
                fn_up += "fn."
            _feedforward(plan, block.fn, f"{o}fn.", fn_up)
        else:
            hp = _attention(plan, block.fn, f"{o}fn.", fn_up, rot_dim if spec.kind == "a" else None)
    if layers.final_norm is not None:
        _norm(plan, layers.final_norm, f"{ours}final_norm.", f"{up}final_norm.", layers.dim)
    if layers.rotary is not None:  # upstream stores its frequencies: they must be ours
        key, expected = f"{up}rotary_pos_emb.inv_freq", layers.rotary.inv_freq
        plan.checks.append((key, lambda t: _check_inv_freq(key, t, expected)))
        if layers.rotary.xpos_scale_base is not None:  # xPos's decay bases, fixed: they must be ours too
            zkey, zeta = f"{up}rotary_pos_emb.scale", layers.rotary.xpos_zeta
            plan.checks.append((zkey, lambda t: _check_inv_freq(zkey, t, zeta)))
    if layers.polar is not None:  # PoPE's learned key phase, stored as upstream's (h, 1, d)
        plan.add(ours + "polar.learned_bias", _same(up + "polar_pos_emb.learned_bias"))
        pkey, pexp = f"{up}polar_pos_emb.inv_freq", layers.polar.inv_freq
        plan.checks.append((pkey, lambda t: _check_inv_freq(pkey, t, pexp)))
    if layers.rel_pos is not None and hasattr(layers.rel_pos, "relative_attention_bias"):  # T5
        dim_head = layers.attn_cfg.dim_head or layers.dim // layers.cfg.heads
        key = "rel_pos.relative_attention_bias.weight"
        plan.add(ours + key, _Source((up + key,), lambda w: (w * dim_head ** 0.5)[:, hp] if hp is not None
                                     else w * dim_head ** 0.5))
    elif layers.rel_pos is not None and hp is not None:  # ALiBi's slopes are fixed per head, not loaded
        raise UpstreamCheckpointError(
            "ALiBi with grouped key/values cannot be loaded: upstream groups query heads h, h + kv_heads, ... "
            "on one kv head, ours h // (heads / kv_heads); the heads would have to be reordered and ALiBi's "
            "slopes are fixed per head")
    if layers.rel_pos is not None and layers.attn_cfg.pre_mix:
        raise UpstreamCheckpointError(
            "pre-softmax talking heads with a position bias (ALiBi / T5) cannot be loaded: upstream mixes the "
            "heads' logits before adding the bias, ours after (the bias is mixed too); post-softmax talking heads load")
    if layers.tupe is not None:
        plan.hint(ours + "tupe", "upstream has no TUPE")
    if layers.reversible is not None:
        raise UpstreamCheckpointError("upstream has no reversible stacks (reversible=True)")


def _check_inv_freq(key, t, expected):
    if t.shape != expected.shape or not torch.allclose(t.float(), expected, rtol=1e-6, atol=0):
        raise UpstreamCheckpointError(
            f"{key}: upstream's rotary frequencies ({t.numel()} of them) differ from this model's "
            f"({expected.numel()}): give rotary_emb_dim (upstream's default is dim_head // 2) and rotary_base "
            f"as upstream had them")


def _wrapper(plan: _Plan, w: TransformerWrapper, ours: str, up: str):
    plan.add(ours + "token_emb.weight", _same(up + "token_emb.emb.weight"))
    if isinstance(w.pos_emb, AbsolutePositionalEmbedding):  # upstream multiplies by emb_dim ** -0.5
        emb_dim = w.token_emb.weight.shape[1]
        plan.add(ours + "pos_emb.emb.weight", _Source((up + "pos_emb.emb.weight",), lambda t: t * emb_dim ** -0.5))
    elif isinstance(w.pos_emb, SinusoidalPositionalEmbedding) and w.pos_emb.scale is not None:
        plan.add(ours + "pos_emb.scale", _Source((up + "pos_emb.scale",), lambda t: t.reshape(())))
    if isinstance(w.project_emb, nn.Linear):
        plan.add(ours + "project_emb.weight", _same(up + "project_emb.weight"))
        plan.add(ours + "project_emb.bias", _same(up + "project_emb.bias"))
    if w.memory_tokens is not None:
        plan.add(ours + "memory_tokens", _same(up + "memory_tokens"))
    if isinstance(w.to_logits, nn.ModuleList):
        for i in range(len(w.to_logits)):
            plan.add(f"{ours}to_logits.{i}.weight", _same(f"{up}to_logits.{i}.weight"))
    elif w.to_logits is not None:
        plan.add(ours + "to_logits.weight", _same(up + "to_logits.weight"))
    _wrapper_extras(plan, w, ours, up)
    if not isinstance(w.attn_layers, AttentionLayers):
        raise UpstreamCheckpointError(f"upstream has no {type(w.attn_layers).__name__}")
    _layers(plan, w.attn_layers, ours + "attn_layers.", up + "attn_layers.")


def _wrapper_extras(plan: _Plan, w: TransformerWrapper, ours: str, up: str):
    """The pooling, head and input tables of heads.py (upstream keeps the same names)."""
    if w.post_emb_norm is not None:  # upstream's wrapper builds this LayerNorm without the unit offset
        plan.add(ours + "post_emb_norm.weight", _same(up + "post_emb_norm.gamma"))
    for key in ("cls_token", "attn_pool.queries", "mixture.combine_mixture.weight", "exit_gate.weight"):
        if key in dict(w.named_parameters()):
            plan.add(ours + key, _same(up + key.removeprefix("mixture.")))
    if w.mixture is not None:  # upstream: Sequential(linear, rearrange)
        plan.add(ours + "mixture.to_mixture.weight", _same(up + "to_mixture.0.weight"))
    if w.embeds is not None:
        for name in w.embeds:
            plan.add(f"{ours}embeds.{name}.weight", _same(f"{up}embeds.{name}.weight"))
    if w.attn_pool is not None:
        pooler = w.attn_pool.pooler
        if isinstance(pooler, Attention):
            _attention(plan, pooler, ours + "attn_pool.pooler.", up + "attn_pool.pooler.", None)
        else:
            _layers(plan, pooler, ours + "attn_pool.pooler.", up + "attn_pool.pooler.")


def make_plan(model: nn.Module, unit_offset: bool = True) -> _Plan:
    """Where each of ``model``'s tensors comes from in an upstream state dict."""
    from .autoregressive import AutoregressiveWrapper

    plan = _Plan(unit_offset)
    if isinstance(model, XTransformer):  # upstream wraps the decoder in its AutoregressiveWrapper
        _wrapper(plan, model.encoder, "encoder.", "encoder.")
        _wrapper(plan, model.decoder, "decoder.", "decoder.net.")
    elif isinstance(model, AutoregressiveWrapper):
        _wrapper(plan, model.net, "net.", "net.")
    elif isinstance(model, TransformerWrapper):
        _wrapper(plan, model, "", "")
    elif isinstance(model, AttentionLayers):
        _layers(plan, model, "", "")
    else:
        raise TypeError(f"load_state_dict takes a TransformerWrapper, XTransformer, AutoregressiveWrapper or "
                        f"AttentionLayers, got {type(model).__name__}")
    return plan


def _listing(keys, limit=12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_state_dict(model: nn.Module, state_dict: dict, strict: bool = True, *, unit_offset: bool = True):
    """Upstream ``state_dict`` -> ours for ``model``. Returns (converted, missing, unexpected):
    our keys with no upstream tensor and upstream keys nothing took. Strict: raises on either,
    and on a shape that does not fit, naming each key."""
    plan = make_plan(model, unit_offset)
    ours = model.state_dict()
    used, converted, missing, errors = set(), {}, [], []
    for key, check in plan.checks:
        if key in state_dict:
            check(state_dict[key])
            used.add(key)
        else:
            missing.append(f"{key} (upstream rotary frequencies)")
    for key, target in ours.items():
        source = plan.sources.get(key)
        if source is None:
            why = plan.hints.get(key) or next((h for k, h in plan.hints.items() if key.startswith(k + ".")), None)
            missing.append(f"{key} (no upstream counterpart{': ' + why if why else ''})")
            continue
        absent = [k for k in source.keys if k not in state_dict]
        if absent:
            missing.extend(f"{k} (for our {key})" for k in absent)
            continue
        used.update(source.keys)
        try:  # the conversions reshape by this model's heads: a tensor of another shape fails in them
            value = source.fn(*(state_dict[k] for k in source.keys))
        except RuntimeError:
            value = None
        if value is None or value.shape != target.shape:
            errors.append(f"{source.keys[0]}: shape {tuple(state_dict[source.keys[0]].shape)} does not fit our {key} "
                          f"{tuple(target.shape)}")
            continue
        converted[key] = value.to(target.dtype)
    unexpected = [k for k in state_dict if k not in used]
    if errors:
        raise UpstreamCheckpointError("upstream checkpoint does not fit: " + "; ".join(errors) +
                                      " (build the model with the keywords the checkpoint was made with)")
    if strict and (missing or unexpected):
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} upstream tensor(s) nothing here takes: {_listing(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing: {_listing(missing)}")
        raise UpstreamCheckpointError("; ".join(parts) + " (build the model with the keywords the checkpoint "
                                      "was made with, or pass strict=False)")
    return converted, missing, unexpected


def load_state_dict(model: nn.Module, state_dict: dict, strict: bool = True, *, unit_offset: bool = True):
    """Load an upstream x-transformers state dict into ``model`` (built with the same keywords).

    ``unit_offset``: upstream's ``norm_add_unit_offset`` (True by default there), under which its
    norms store ``gamma - 1``. Returns ``(missing, unexpected)`` key lists (empty when strict).
    """
    converted, missing, unexpected = convert_state_dict(model, state_dict, strict, unit_offset=unit_offset)
    model.load_state_dict(converted, strict=strict)
    return missing, unexpected
