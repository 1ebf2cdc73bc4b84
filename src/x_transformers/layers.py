"""The layer stack: ``AttentionLayers`` and its faces ``Encoder``, ``Decoder``, ``CrossAttender``
(``PrefixDecoder`` lives in :mod:`.prefix_decoder`; re-exported here).

The stack is a layout (explicit data: a tuple of ``LayerSpec``, printed as ``a f a f ...``) of
self-attention ``a``, cross-attention ``c`` and feed-forward ``f`` blocks, each inside a
:class:`~x_transformers.residual.Residual` that places its norm. One builder resolves every
layout keyword (macaron, sandwich_coef, custom_layers).

Legend: b batch, n new tokens, m all keys (cached included), h heads.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .hub import Pretrained
from . import block_inputs, checks, recurrence, stack_calls
from .checks import check_attn_mask, check_mask  # noqa: F401  (imported from here by the wrappers)
from .attention import Attention
from .qk_clip import qk_clip_blocks
from .blocks import ForwardContext, ScoreCarry, UNetSkips, drop_context_tokens, kv_residuals_per_block, run_sequential
from .adaptive import Conditioning, apply_norm
from .cache import Intermediates, StaticKVCache
from .config import ADAPTIVE, AttentionConfig, FeedForwardConfig, LayersConfig, build, split_layer_kwargs
from .feedforward import FeedForward, softclamp
from .norms import make_norm
from .positional import AlibiPositionalBias, PolarEmbedding, DynamicPositionBias, RotaryEmbedding, T5RelativePositionBias, TUPEPositionalBias
from .hyper import AttentionIntegration, GatedMultiResidual, HyperResidual, LayerIntegration
from .layout import (LayerSpec, attn_to_ff, build_layout, cross_attn_per_block, par_layout, per_layer,  # noqa: F401
                     pop_cross_attn, pop_schedules, unit_length)
from .residual import Residual, shift_amounts
from .residual_updates import make_update
from .reversible import ReversibleStack
from .value_residual import ValueResidual


def default_positions(mask, n: int, device, start=None):
    """Positions of n new tokens: they count kept tokens, so padding anywhere shifts nothing.
    mask: (b, n) bool or None; start: (b, 1) positions already taken (a cache), or None. -> (b or 1, n) long.
    """
    if mask is None and n == 1 and start is not None:
        return start  # one new token (a decode step): at the next position, no operator
    if mask is None:
        pos = torch.arange(n, device=device)[None]
    else:
        pos = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return pos if start is None else pos + start


def check_stack_inputs(stack, x, mask, context, context_mask, *, direct: bool = True):
    """The call-time checks of a layer stack (``stack.dim``, ``stack.needs_context``). ``direct``:
    called on a user's embeddings (TransformerWrapper passes positions and its own embeddings),
    so they are also checked for NaN/inf."""
    if x.ndim != 3 or x.shape[-1] != stack.dim:
        raise ValueError(f"expected embeddings of shape (batch, seq, {stack.dim}), got {tuple(x.shape)}")
    check_mask(mask, x.shape[0], x.shape[1])
    checks.check_stack_inputs(stack, x, context, finite=direct)
    if stack.needs_context:
        if context is None:
            raise ValueError("this stack has cross-attention layers: pass context=(batch, ctx_len, dim)")
        check_mask(context_mask, context.shape[0], context.shape[1], "context_mask")
    elif context is not None:
        raise ValueError("context was given but this stack has no cross-attention (set cross_attend=True)")


class AttentionLayers(Pretrained, nn.Module):
    """A stack of attention and feed-forward blocks over embeddings x (b, n, dim).

    Keywords: :class:`LayersConfig` names; ``attn_*`` for :class:`AttentionConfig`; ``ff_*`` for
    :class:`FeedForwardConfig`.
    """

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        super().__init__()
        where = type(self).__name__
        # (the conflict table reads heads and depth)
        kwargs, cross_opts = pop_cross_attn(kwargs)  # upstream's cross_attn_ options (layout.py)
        kwargs, schedules = pop_schedules(kwargs)  # per-layer tuples (layout.py), checked per layer below
        lk, ak, fk = split_layer_kwargs(dict(kwargs, heads=heads, depth=depth), where)
        lk.pop("heads")
        lk.pop("depth")
        if isinstance(lk.get("shift_tokens"), list):
            lk["shift_tokens"] = tuple(lk["shift_tokens"])
        if isinstance(lk.get("custom_layers"), list):
            lk["custom_layers"] = tuple(lk["custom_layers"])
        self.cfg = cfg = build(LayersConfig, dict(dim=dim, depth=depth, heads=heads, **lk), where)
        self.attn_cfg = attn_cfg = build(AttentionConfig, ak, where, prefix="attn_")
        self.ff_cfg = ff_cfg = build(FeedForwardConfig, fk, where, prefix="ff_")
        self._check(cfg, attn_cfg, ff_cfg)

        self.dim = dim
        self.causal = cfg.causal
        built, order = self._execution(cfg)
        self.layout = tuple(built[i] for i in order)  # the blocks as they run
        norm = ("scalenorm" if cfg.use_scalenorm else "rmsnorm" if cfg.use_rmsnorm
                else "simple_rmsnorm" if cfg.use_simple_rmsnorm else "dynamic_tanh" if cfg.use_dynamic_tanh
                else "derf" if cfg.use_derf else "layernorm")
        self.norm_name = norm
        placement = "rezero" if cfg.use_rezero else "sandwich" if cfg.sandwich_norm else "pre" if cfg.pre_norm else "post"
        self.placement = placement
        norm_options = dict(init_alpha=cfg.dynamic_tanh_init_alpha) if cfg.use_dynamic_tanh else {}

        # adaptive norms / branch scales read a condition (adaptive.py), checked and prepared per forward
        adaptive = any(getattr(cfg, f) for f in ADAPTIVE)
        self.conditioning = cond = Conditioning(cfg, dim) if adaptive else None
        if cond is not None and cond.norm is not None:
            self.norm_name = f"adaptive_{cond.norm}"

        def make():
            if cond is not None and cond.norm is not None:
                return cond.make_norm()
            return make_norm(norm, dim, eps=cfg.norm_eps, bias=cfg.norm_bias, **norm_options)

        # a number for scale_residual / depth_scale_residual scales every branch (upstream's Scale)
        branch_scale = 1.0
        for value in (cfg.scale_residual, cfg.depth_scale_residual):
            if not isinstance(value, bool):
                branch_scale *= float(value)

        # TUPE scales the word-to-word logits by 1/sqrt(2d), like its positional term; under QK-norm the
        # learned scale stands in for it, and a given attn_scale replaces it
        tupe_scale = cfg.tupe and not attn_cfg.qk_norm and attn_cfg.scale is None
        self_cfg = replace(attn_cfg, scale=(2 * attn_cfg.dim_head) ** -0.5) if tupe_scale else attn_cfg
        shifts = cfg.shift_tokens if isinstance(cfg.shift_tokens, tuple) else (cfg.shift_tokens,) * len(built)
        if len(shifts) != len(built):
            raise ValueError(f"shift_tokens as a tuple needs one amount per block: {len(built)} blocks "
                             f"({' '.join(str(s) for s in built)}), got {len(shifts)}")
        blocks, own = [], per_layer(built, schedules)
        for j in range(max(map(len, schedules.values()), default=1) if schedules else 0):  # each layer's conflicts
            split_layer_kwargs(dict(kwargs, **{k: v[j] for k, v in schedules.items() if j < len(v)},
                                    heads=heads, depth=depth), where)
        cross_own = cross_attn_per_block(built, cross_opts, dict(kwargs, heads=heads, depth=depth), where)
        self.inverted = attn_cfg.inverted_attention or any(o.get("inverted_attention") for o in cross_own)
        cross_index = iter(cross_own)
        # value residual: a learned mix in every self-attention after the first built one (upstream's rule)
        first_a = next((i for i, s in enumerate(built) if s.kind == "a"), None)
        # q, k, v from three mixtures (hyper-connections' reads, or LIMe's; its first self-attention reads one).
        # LIMe's first block mixes one input: a softmax over it is 1, so no router is built there
        qkv_views = cfg.qkv_receive_diff_residuals or cfg.integrate_layers
        for index, spec in enumerate(built):
            views = 3 if spec.kind == "a" and qkv_views and not (cfg.integrate_layers and index == first_a) else 1
            if spec.kind == "f":
                fn = FeedForward(dim, replace(ff_cfg, **{k[3:]: v for k, v in own[index].items()}))
            else:
                mix = cfg.add_value_residual and cfg.learned_value_residual_mix and spec.kind == "a" and index != first_a
                layer_cfg = replace(self_cfg, **{k[5:]: v for k, v in own[index].items()}) if spec.kind == "a" else \
                    replace(attn_cfg, **{k[5:]: AttentionConfig.__dataclass_fields__[k[5:]].default
                                         for k in schedules if k.startswith("attn_")},  # (upstream: defaults)
                            **next(cross_index))
                fn = Attention(dim, heads, layer_cfg, causal=cfg.causal,
                               cross=spec.kind == "c", dim_context=cfg.dim_context,
                               polar=cfg.polar_pos_emb and spec.kind == "a", value_mix=mix)
            options = dict(placement=placement, make_norm=make, scale=spec.scale * branch_scale,
                           shifts=shift_amounts(shifts[index], cfg.causal),
                           layer_dropout=cfg.layer_dropout, post_norm=cfg.pre_and_post_norm, dim=dim,
                           layerscale=cfg.layerscale_init_value if cfg.use_layerscale else None,
                           adaptive_scale=cond.make_layerscale() if cond is not None else None,
                           integrate=self._integration(cfg, index, views))
            if cfg.gated_multi_residual:
                blocks.append(GatedMultiResidual(fn, streams=cfg.num_residual_streams, layer_index=index,
                                                 **cfg.residual_fn_kwargs, **options))
            elif cfg.num_residual_streams > 1:
                blocks.append(HyperResidual(fn, streams=cfg.num_residual_streams, layer_index=index,
                                            sinkhorn_iters=cfg.hyper_conn_sinkhorn_iters,
                                            views=1 if cfg.integrate_layers else views, **options))
            else:
                blocks.append(Residual(fn, skip_scale=cfg.scale_residual is True,
                                       skip_constant=cfg.scale_residual_constant, gru=cfg.gate_residual,
                                       update=make_update(cfg, dim), **options))
        # repeated entries are one module (weight tying): parameters() counts it once
        self.blocks = nn.ModuleList(blocks[i] for i in order)
        has_final = placement in ("pre", "sandwich") and cfg.pre_norm_has_final_norm and not cfg.pre_and_post_norm
        self.final_norm = make() if has_final else None
        # DEQ (1909.01377): a projection of the stack's input added to every branch's input
        self.reinject = nn.Linear(dim, dim, bias=False) if cfg.reinject_input else None
        self.reinject_gate = nn.Linear(dim, 1, bias=False) if cfg.learned_reinject_input_gate else None
        # hyper-connections: the streams' learned embeddings, added as x becomes s streams
        streams = cfg.num_residual_streams
        self.stream_emb = nn.Parameter(torch.zeros(streams, dim)) if streams > 1 or cfg.gated_multi_residual else None
        self.unet = UNetSkips(dim, cfg.depth, len(build_layout(cfg, depth=1))) if cfg.unet_skips else None
        # 2001.04451: run the blocks as a two-stream coupling, activations recomputed in backward
        self.reversible = ReversibleStack(self.layout) if cfg.reversible else None

        dim_head = attn_cfg.dim_head
        self.rotary = None
        if cfg.rotary_pos_emb:
            self.rotary = RotaryEmbedding(cfg.rotary_dim(dim_head), base=cfg.rotary_base,
                                          interpolation_factor=cfg.rotary_interpolation_factor,
                                          base_rescale_factor=cfg.rotary_base_rescale_factor,
                                          xpos_scale_base=cfg.rotary_xpos_scale_base if cfg.rotary_xpos else None)
        self.polar = PolarEmbedding(dim_head, heads, cfg.polar_bias_uniform_init) if cfg.polar_pos_emb else None
        self.rel_pos = None
        if cfg.alibi_pos_bias:
            self.rel_pos = AlibiPositionalBias(heads, cfg.alibi_num_heads, **(cfg.rel_pos_kwargs or {}))
        elif cfg.dynamic_pos_bias:
            self.rel_pos = DynamicPositionBias(dim // 4, heads, depth=cfg.dynamic_pos_bias_mlp_depth,
                                               log_distance=cfg.dynamic_pos_bias_log_distance,
                                               norm=cfg.dynamic_pos_bias_norm)
        elif cfg.rel_pos_bias:
            self.rel_pos = T5RelativePositionBias(heads, causal=cfg.causal, num_buckets=cfg.rel_pos_num_buckets,
                                                  max_distance=cfg.rel_pos_max_distance)
        self.tupe = None
        if cfg.tupe:
            self.tupe = TUPEPositionalBias(dim, heads, dim_head, cfg.tupe_max_seq_len, untie_cls=cfg.tupe_untie_cls)
        per_unit = unit_length(cfg)
        self._units = {id(b.fn): i // per_unit + 1 for i, b in reversed(list(enumerate(self.blocks)))}
        self._out_std = 0.02 / (2 * cfg.depth) ** 0.5
        self.apply(self._init_weights)

    @staticmethod
    def _integration(cfg: LayersConfig, index: int, views: int):
        """Block ``index``'s router over the earlier blocks' inputs (hyper.py): LIMe's or aggregated
        residuals'; None where it would mix one input by a softmax (always 1) or neither is on."""
        rms = lambda: make_norm("rmsnorm", cfg.dim, eps=cfg.norm_eps)  # noqa: E731
        if cfg.integrate_layers and (index > 0 or not cfg.layer_integrate_use_softmax):
            return LayerIntegration(cfg.dim, index + 1, views=views, make_norm=rms,
                                    use_softmax=cfg.layer_integrate_use_softmax)
        if cfg.attn_aggregated_residuals and index > 0:
            AttentionIntegration.check_kwargs(cfg.attn_aggregated_residual_kwargs)
            return AttentionIntegration(cfg.dim, index + 1, make_norm=rms, **(cfg.attn_aggregated_residual_kwargs or {}))
        return None

    @staticmethod
    def _execution(cfg: LayersConfig):
        """(the blocks to build, the order they run in): ``weight_tie_layers`` builds one unit and
        runs it depth times, or, on a layout that is no repeated unit (sandwich_coef, par_ratio,
        custom_layers, top_attn_to_ff), one block of each kind that every block of the kind runs
        (ALBERT's all-shared layers); ``layers_execute_order`` runs the built blocks in its order."""
        if cfg.weight_tie_layers and unit_length(cfg) > 1:
            unit = build_layout(cfg, depth=1)
            return unit, tuple(range(len(unit))) * cfg.depth
        if cfg.weight_tie_layers:
            layout = build_layout(cfg)
            kinds = list(dict.fromkeys(layout))  # (kind, branch scale), in order of first use
            return tuple(kinds), tuple(kinds.index(s) for s in layout)
        built = build_layout(cfg)
        order = cfg.layers_execute_order
        if order is None:
            return built, tuple(range(len(built)))
        if max(order) >= len(built):
            raise ValueError(f"layers_execute_order names block {max(order)}, but the layout has {len(built)} blocks "
                             f"({' '.join(str(s) for s in built)})")
        return built, tuple(order)

    def init_outputs(self, total_depth: int):
        """Initialise every branch's output projection again, GPT-2's std counting ``total_depth``
        layers (a funnel counts all of its blocks)."""
        self._out_std = 0.02 / (2 * total_depth) ** 0.5
        for fn in {id(b.fn): b.fn for b in self.blocks}.values():
            self._init_output(fn)

    def _init_output(self, fn):
        """A branch's output projection: GPT-2's N(0, 0.02 / sqrt(2 * depth)); zero with
        ``zero_init_branch_output`` (or the block's own ``ff_zero_init_output``); OLMo's
        N(0, 1 / (2 * fan_in * unit)) with ``depth_scale_residual=True``, unit the branch's 1-based
        unit in the stack (or ``ff_output_proj_depth``)."""
        layer = fn.proj_out if isinstance(fn, FeedForward) else fn.to_out
        if isinstance(layer, nn.Sequential):  # attention's output projection and its gate (on_attn)
            layer = layer[0]
        if layer is None:  # attn_project_out=False: no output projection to initialise
            fn.reset_variant_parameters()
            return
        if self.cfg.zero_init_branch_output:
            nn.init.zeros_(layer.weight)
        elif self.cfg.depth_scale_residual is True:
            nn.init.normal_(layer.weight, std=(2 * layer.in_features * self._units[id(fn)]) ** -0.5)
        elif isinstance(fn, FeedForward):
            fn.init_output(self._out_std)
        else:
            nn.init.normal_(layer.weight, std=self._out_std)
        if layer.bias is not None and not isinstance(fn, FeedForward):
            nn.init.zeros_(layer.bias)
        if hasattr(fn, "reset_variant_parameters"):  # attention's own output inits (gating.py) win
            fn.reset_variant_parameters()

    @staticmethod
    def _check(cfg: LayersConfig, attn_cfg: AttentionConfig, ff_cfg: FeedForwardConfig):
        if attn_cfg.kv_heads is not None and cfg.heads % attn_cfg.kv_heads:
            raise ValueError(f"attn_kv_heads ({attn_cfg.kv_heads}) must divide heads ({cfg.heads})")
        widest = max(cfg.shift_tokens) if isinstance(cfg.shift_tokens, tuple) else cfg.shift_tokens
        if widest and (1 if cfg.causal else 2) * widest + 1 > cfg.dim:
            raise ValueError(f"shift_tokens ({widest}) splits dim ({cfg.dim}) into more groups than it has channels")
        if ff_cfg.dim_out not in (None, cfg.dim):
            raise ValueError(f"ff_dim_out ({ff_cfg.dim_out}) must equal dim ({cfg.dim}) in a stack: the feed-forward's "
                             f"output is added to the residual stream")
        dim_head = attn_cfg.dim_head
        if cfg.rotary_base_rescale_factor != 1.0 and cfg.rotary_pos_emb and cfg.rotary_dim(dim_head) < 4:
            raise ValueError("rotary_base_rescale_factor needs at least 4 rotated channels (rotary_emb_dim >= 4): "
                             "it rescales the base by factor ** (r / (r - 2))")
        if cfg.rotary_pos_emb and cfg.rotary_dim(dim_head) > dim_head:
            raise ValueError(f"rotary_emb_dim ({cfg.rotary_emb_dim}) must be at most the head dimension "
                             f"(attn_dim_head={dim_head})")

    def _init_weights(self, module):
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases; the residual output projections
        # then get their own (init_outputs)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if id(module) in getattr(self, "_units", {}):
            self._init_output(module)
        elif hasattr(module, "reset_variant_parameters") and module is not self:
            module.reset_variant_parameters()  # zero-initialised gates and outputs stay so

    def muon_parameters(self) -> list:
        """Upstream's Muon parameter group: every attention's and feed-forward's own choice, once each."""
        found = {id(p): p for m in self.modules() if isinstance(m, (Attention, FeedForward)) for p in m.muon_parameters()}
        return list(found.values())

    def attn_qk_clip_(self, intermediates, tau: float = 100.0):
        """Upstream's QK-clip of every attention block (2507.20534), from a training forward's
        ``return_intermediates`` (their ``attn_logit_maxes``; attention.qk_clip_blocks)."""
        blocks = [b.fn for b in self.blocks if isinstance(getattr(b, "fn", None), Attention)]
        qk_clip_blocks(blocks, intermediates.attn_logit_maxes, tau)

    @property
    def layer_cfg(self) -> LayersConfig:
        return self.cfg

    @property
    def layout_string(self) -> str:
        return " ".join(str(s) for s in self.layout)

    @property
    def has_relative_positions(self) -> bool:
        return self.cfg.has_relative_positions

    @property
    def needs_context(self) -> bool:
        return any(s.kind == "c" for s in self.layout)

    def extra_repr(self):
        rev = ", reversible" if self.reversible is not None else ""
        return f"layout={self.layout_string}, norm={self.norm_name}, placement={self.placement}{rev}"

    def score_mod(self, q_pos, k_pos):
        """The stack's position bias between query and key positions, as a ScoreMod (or None):
        a description, materialised at most once per forward and only if the chosen attention
        kernel needs the tensor (FlexAttention computes ALiBi / T5 in its kernel)."""
        mod = self.rel_pos.score_mod(q_pos, k_pos) if self.rel_pos is not None else None
        if self.tupe is not None:  # TUPE-R when a relative bias is on: it is reset with the rest at [CLS]
            mod = self.tupe.score_mod(q_pos, k_pos, mod)
        return mod

    def forward_context(self, positions, *, key_positions=None, self_mask=None, context=None, context_mask=None,
                        cache=None, need_weights=False) -> ForwardContext:
        """The per-forward context every block reads: rotary angles and position bias at these
        positions (keys at ``key_positions``, default the same), masks as (b, 1, 1, m)."""
        key_positions = positions if key_positions is None else key_positions
        token_mask = None  # (b, n): which new tokens are kept (token shifting, mv-split, inverted cross-attention)
        if (self.cfg.shift_tokens or self.cfg.mv_split_residual or self.inverted) \
                and self_mask is not None:
            n = positions.shape[-1]
            token_mask = self_mask[:, 0, 0, -n:] if self_mask.shape[-2] == 1 else \
                self_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (an attn_mask's diagonal: each token itself)
        angles, phase = self.polar(positions) if self.polar is not None else (None, None)
        return ForwardContext(
            polar_angles=angles, polar_bias=phase, positions=positions, key_positions=key_positions, self_mask=self_mask, token_mask=token_mask,
            rotary=self.rotary(positions) if self.rotary is not None else None,
            score_mod=self.score_mod(positions, key_positions),
            context=context, context_mask=context_mask[:, None, None, :] if context_mask is not None else None,
            cache=cache, need_weights=need_weights, values=ValueResidual() if self.cfg.add_value_residual else None)

    def run(self, x, ctx: ForwardContext, attns: list | None = None, order: tuple | None = None):
        """The blocks over x (b, n, dim) under ``ctx``: plain or reversible, then the final norm.
        ``order``: indices of the blocks to run instead of the layout (upstream's ``repeat_blocks``)."""
        if self.training and self.cfg.cross_attn_tokens_dropout > 0 and ctx.context is not None:
            ctx = drop_context_tokens(ctx, self.cfg.cross_attn_tokens_dropout)
        if self.reinject is not None:
            inject = self.reinject(x)
            if self.reinject_gate is not None:
                inject = inject * torch.sigmoid(self.reinject_gate(x))
            ctx = replace(ctx, inject=inject)
        if self.cfg.integrate_layers or self.cfg.attn_aggregated_residuals:  # a fresh list of block inputs per run
            ctx = replace(ctx, layer_inputs=[])
        if self.cfg.residual_attn or self.cfg.cross_residual_attn:  # RealFormer: fresh score carries
            ctx = replace(ctx, self_scores=ScoreCarry() if self.cfg.residual_attn else None,
                          cross_scores=ScoreCarry() if self.cfg.cross_residual_attn else None)
        if self.stream_emb is not None:  # hyper.py: (b, n, d) -> (b, n, s, d) residual streams
            x = x[..., None, :] + self.stream_emb
        if self.reversible is not None:  # reversible.py: the same runner, one branch at a time
            x = self.reversible(self.blocks, x, ctx, attns)
        else:
            layout, blocks = (self.layout, self.blocks) if order is None else \
                ([self.layout[i] for i in order], [self.blocks[i] for i in order])
            x = run_sequential(layout, blocks, x, ctx, attns, skips=self.unet)
        if self.cfg.softclamp_output:  # Gemma 2: bounded by +-value, before the final norm
            x = softclamp(x, self.cfg.softclamp_output_value)
        if self.stream_emb is not None:
            x = x.sum(dim=-2)
        return apply_norm(self.final_norm, x, ctx.condition) if self.final_norm is not None else x

    def forward(self, x, mask=None, context=None, context_mask=None, *, positions=None, cache=None,
                return_attn: bool = False, attn_mask=None, condition=None, mems=None, mem_masks=None,
                hiddens: list | None = None, ff_deep_embeds=None, pos=None, context_pos=None,
                return_hiddens: bool = False, cache_age: int = 1, layer_hiddens: list | None = None,
                repeat_blocks=None, causal: bool | None = None, self_attn_additional_kv=None,
                additional_kv_mask=None, detach_additional_kv: bool = False, cross_attn_kv_residuals=None,
                self_attn_kv_residuals=None, transform_block_inputs=None, block_hiddens: list | None = None):
        """x (b, n, dim) -> (b, n, dim); with ``return_attn`` also the list of attention maps.

        mask: (b, n) bool, True = keep. context / context_mask: cross-attention inputs.
        positions: (b|1, n) long, computed from the mask (and cache) when omitted.
        cache: a :class:`~x_transformers.cache.KVCache`, read and extended in place.
        attn_mask: (b|1, 1, n, n) bool, which query may see which key (True = may), ANDed with
        ``mask`` and the stack's causality; no cache.
        condition: (b, dim_condition) or (b, n, dim_condition), for adaptive norms / scales only.
        mems / mem_masks: Transformer-XL memories (recurrence.py), one (b, m, dim) tensor (and (b, m)
        mask or None) per self-attention block; ``hiddens``: a list that receives each self-attention
        block's input (the next memories). ``ff_deep_embeds`` (b, n, units, dim): the output scale
        of the l-th feed-forward block at [:, :, l] (the wrapper's ``ff_deep_embed``).
        ``self_attn_kv_residuals`` (b, n|1, dim) or (L, b, n|1, dim): added to the key/value input (not
        the queries') of the first (l-th) self-attention block (upstream's; the Free Transformer's latent).
        Upstream's ``pos``, ``context_pos``, ``return_hiddens`` (``cache=`` its Intermediates, ``cache_age``): stack_calls.py.
        ``layer_hiddens`` / ``block_hiddens``: lists receiving each block's input / output; ``transform_block_inputs``: block_inputs.py.
        """
        if return_hiddens:
            return stack_calls.forward_with_hiddens(self, x, mask, context, context_mask, cache=cache,
                                                    cache_age=cache_age, kwargs=dict(
                positions=positions, return_attn=return_attn, attn_mask=attn_mask, condition=condition, mems=mems,
                mem_masks=mem_masks, hiddens=hiddens, ff_deep_embeds=ff_deep_embeds, pos=pos, context_pos=context_pos,
                repeat_blocks=repeat_blocks, causal=causal, self_attn_additional_kv=self_attn_additional_kv,
                additional_kv_mask=additional_kv_mask, detach_additional_kv=detach_additional_kv,
                cross_attn_kv_residuals=cross_attn_kv_residuals, transform_block_inputs=transform_block_inputs))
        if isinstance(cache, Intermediates):
            raise ValueError("cache= an Intermediates is upstream's call: pass return_hiddens=True with it")
        check_stack_inputs(self, x, mask, context, context_mask, direct=positions is None)
        io = block_inputs.prepare(self, transform_block_inputs, block_hiddens, repeat_blocks)
        b, n, _ = x.shape
        if attn_mask is not None:
            if cache is not None:
                raise ValueError("attn_mask cannot be combined with a cache (it is over this call's n x n pairs)")
            check_attn_mask(attn_mask, b, n)

        if cache is not None and self.cfg.mv_split_residual:
            raise ValueError("mv_split_residual takes means over every earlier token, which a key/value cache does "
                             "not keep; decode without a cache (cache_kv=False)")
        if cache is not None and self.cfg.shift_tokens:
            raise ValueError("shift_tokens mixes each token with its predecessors' features, which a key/value cache "
                             "does not keep; decode without a cache (cache_kv=False)")
        head_pos = None
        if pos is not None:
            if positions is not None:
                raise TypeError("got pos and positions, two values for the tokens' positions; give one of them")
            positions, head_pos = stack_calls.custom_positions(self, pos, b, n, cached=cache is not None)
        start = cache.next_positions() if cache is not None and positions is None else None
        if positions is None:
            positions = default_positions(mask, n, x.device, start)
        key_positions, self_mask = positions, mask[:, None, None, :] if mask is not None else None
        if attn_mask is not None:
            self_mask = attn_mask if self_mask is None else self_mask & attn_mask  # (b, 1, n, n)
        causal = stack_calls.causal_override(self, causal, cache=cache, xl=mems is not None or hiddens is not None)
        if cache is not None:
            if not self.causal:
                raise ValueError("a key/value cache needs a causal stack (Decoder): a bidirectional layer's "
                                 "outputs change when later tokens arrive, so it cannot decode incrementally")
            key_positions, self_mask = cache.keys_and_mask(mask, positions)  # cached keys + the new ones

        ctx = self.forward_context(positions, key_positions=key_positions, self_mask=self_mask, context=context,
                                   context_mask=context_mask, cache=cache, need_weights=return_attn)
        ctx = stack_calls.call_context(self, ctx, b, causal=causal, head_pos=head_pos, context_pos=context_pos,
                                       layer_hiddens=layer_hiddens, block_io=io, additional=(self_attn_additional_kv,
                                       additional_kv_mask, detach_additional_kv), cross_residuals=cross_attn_kv_residuals)
        if self.conditioning is not None:
            ctx = replace(ctx, condition=self.conditioning(condition, b, n))
        elif condition is not None:
            raise ValueError("condition was given but this stack has no adaptive norm or scale "
                             "(use_adaptive_layernorm / use_adaptive_rmsnorm / use_adaptive_layerscale)")
        if mems is not None or hiddens is not None:
            ctx = self._recurrence(ctx, x, mems, mem_masks, hiddens, attn_mask, cache)
        if ff_deep_embeds is not None:  # the l-th feed-forward block scales its output by [:, :, l]
            scales = iter(ff_deep_embeds.unbind(dim=2))
            ctx = replace(ctx, ff_embeds=tuple(next(scales, None) if s.kind == "f" else None for s in self.layout))
        if self_attn_kv_residuals is not None:
            if self.reversible is not None:
                raise ValueError("self_attn_kv_residuals is not supported with reversible=True (the recomputing "
                                 "backward takes no per-block inputs)")
            ctx = replace(ctx, kv_residuals=kv_residuals_per_block(self.layout, self_attn_kv_residuals, b, n, self.dim))
        order = None if repeat_blocks is None else stack_calls.repeat_order(
            self, repeat_blocks, per_block=any(v is not None for v in (cache, ctx.mems, ctx.hiddens, ctx.ff_embeds)))
        attns = [] if return_attn else None
        x = block_inputs.finish(io, self.run(x, ctx, attns, order))

        if cache is not None:
            new = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
            cache.extend(new, positions, padded=mask is not None)  # (the positions keys_and_mask got)
        return (x, attns) if return_attn else x

    def _recurrence(self, ctx, x, mems, mem_masks, hiddens, attn_mask, cache):
        """The context with Transformer-XL memories (recurrence.py) and the hidden-state collector."""
        why = ("a bidirectional stack" if not self.causal else "reversible=True" if self.reversible is not None
               else "hyper-connections" if self.stream_emb is not None else "shift_tokens" if self.cfg.shift_tokens
               else "TUPE" if self.tupe is not None else "attn_mask" if attn_mask is not None
               else "a StaticKVCache" if isinstance(cache, StaticKVCache) else None)
        if why is not None:
            raise ValueError(f"Transformer-XL memories (mems / return_mems) are not supported with {why}: "
                             f"they need a causal, sequential stack whose blocks see only the sequence")
        if hiddens is not None:
            ctx = replace(ctx, hiddens=hiddens)
        if mems is None:
            return ctx
        recurrence.check_mems(mems, mem_masks, batch=x.shape[0], dim=self.dim,
                              count=recurrence.self_attention_count(self.layout))
        return recurrence.with_memory(self, ctx, mems, mem_masks, x.shape[0])


def _check_causal(kwargs):
    # Encoder / Decoder take causal themselves (it names the class), so the config's type check never sees it
    if "causal" in kwargs and not isinstance(kwargs["causal"], bool):
        raise ValueError(f"causal must be True or False, got {kwargs['causal']!r}")


class Encoder(AttentionLayers):
    """Bidirectional self-attention stack."""

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        _check_causal(kwargs)
        if kwargs.get("causal"):
            raise ValueError("an Encoder is bidirectional; use Decoder for causal attention")
        kwargs.pop("causal", None)
        super().__init__(dim, depth, heads, causal=False, **kwargs)


class Decoder(AttentionLayers):
    """Causal self-attention stack (``cross_attend=True`` adds cross-attention)."""

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        _check_causal(kwargs)
        if kwargs.get("causal") is False:
            raise ValueError("a Decoder is causal; use Encoder for bidirectional attention")
        kwargs.pop("causal", None)
        super().__init__(dim, depth, heads, causal=True, **kwargs)


class CrossAttender(AttentionLayers):
    """Cross-attention and feed-forward blocks only (no self-attention)."""

    def __init__(self, dim: int, depth: int, heads: int = 8, **kwargs):
        kwargs.pop("only_cross", None)
        super().__init__(dim, depth, heads, only_cross=True, **kwargs)


from .prefix_decoder import PrefixDecoder  # noqa: E402,F401  (upstream's path: x_transformers.x_transformers)
