"""The stack's layout: which blocks run in which order, as data (a tuple of :class:`LayerSpec`, printed
``a f a f ...``). One builder resolves every layout keyword: macaron, sandwich_coef, par_ratio,
custom_layers, then top_attn_to_ff (:func:`attn_to_ff`)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import LayersConfig


@dataclass(frozen=True)
class LayerSpec:
    kind: str  # "a" self-attention, "c" cross-attention, "f" feed-forward
    scale: float = 1.0  # residual branch scale (0.5 for macaron's half-step feed-forwards)

    def __str__(self):
        return self.kind if self.scale == 1.0 else f"{self.kind}*{self.scale:g}"


def build_layout(cfg: LayersConfig, depth: int | None = None) -> tuple[LayerSpec, ...]:
    """Resolve the layout keywords into the explicit sequence of blocks (``depth`` units, default
    cfg.depth). ``only_attn`` drops the feed-forwards of whatever layout the others make; then
    ``top_attn_to_ff`` turns the last n self-attention blocks of the result into feed-forwards (on
    only_attn's ``a a a``: ``a a f``)."""
    layout = _layout(cfg, cfg.depth if depth is None else depth)
    if cfg.only_attn:
        layout = tuple(s for s in layout if s.kind != "f")
    return attn_to_ff(layout, cfg.top_attn_to_ff)


def unit_length(cfg: LayersConfig) -> int:
    """Blocks per repeated unit (``a f``, ``a c f``, macaron's ``f a f``); 1 for the layouts that
    are not repeated units (custom_layers, sandwich_coef) and under top_attn_to_ff."""
    if cfg.custom_layers is not None or cfg.sandwich_coef is not None or cfg.par_ratio is not None \
            or cfg.top_attn_to_ff:
        return 1
    return len(build_layout(cfg, depth=1))


def _layout(cfg: LayersConfig, depth: int) -> tuple[LayerSpec, ...]:
    attn = ("c",) if cfg.only_cross else ("a", "c") if cfg.cross_attend else ("a",)
    if cfg.custom_layers is not None:
        layout = tuple(LayerSpec(k) for k in cfg.custom_layers)
    elif cfg.par_ratio is not None:
        layout = tuple(LayerSpec(k) for k in par_layout(attn, depth * (len(attn) + 1), cfg.par_ratio))
    elif cfg.sandwich_coef is not None:  # 1911.03864: k attentions first, k feed-forwards last
        k = cfg.sandwich_coef
        unit = ("f",) + attn + ("f",) if cfg.macaron else attn + ("f",)  # macaron's unit in the middle
        kinds = attn * k + unit * (depth - k) + ("f",) * k
        half = 0.5 if cfg.macaron else 1.0  # with macaron every feed-forward is a half step, as upstream
        layout = tuple(LayerSpec(x, half if x == "f" else 1.0) for x in kinds)
    elif cfg.macaron:  # 1906.02762: half-step FF, attention, half-step FF
        layout = ((LayerSpec("f", 0.5),) + tuple(LayerSpec(k) for k in attn) + (LayerSpec("f", 0.5),)) * depth
    else:
        layout = tuple(LayerSpec(x) for x in attn + ("f",)) * depth
    return layout


def par_layout(attn: tuple[str, ...], total: int, ratio: int) -> tuple[str, ...]:
    """Sandwich-style "PAR" layout (1911.03864's attention-first reordering): of ``total`` blocks,
    total // ratio attention units spread over the bottom two thirds, each followed by
    feed-forwards, then feed-forwards only (upstream's par_ratio)."""
    if not 1 < ratio <= total:
        raise ValueError(f"par_ratio ({ratio}) must lie in (1, {total}], {total} being depth times the blocks per layer")
    n_attn = total // ratio
    cut = total * 2 // 3
    width = (cut + cut // n_attn) // n_attn
    if width < len(attn):
        raise ValueError(f"par_ratio ({ratio}) leaves {width} blocks per attention unit, fewer than its "
                         f"{len(attn)} attention blocks; lower par_ratio")
    head = (attn + ("f",) * (width - len(attn))) * n_attn
    return head + ("f",) * (total - len(head))


def attn_to_ff(layout: tuple[LayerSpec, ...], n: int) -> tuple[LayerSpec, ...]:
    """2005.13895: the top (last) n self-attention blocks of any layout become feed-forwards;
    cross-attention stays. On ``a f`` units that is the top n layers' attention; on a sandwich or
    custom layout, its last n ``a`` blocks."""
    if not n:
        return layout
    where = [i for i, s in enumerate(layout) if s.kind == "a"]
    if n > len(where):
        raise ValueError(f"top_attn_to_ff ({n}) must be at most the number of self-attention blocks of the "
                         f"layout ({len(where)}: {' '.join(str(s) for s in layout)})")
    top = set(where[len(where) - n:])
    return tuple(LayerSpec("f") if i in top else s for i, s in enumerate(layout))


# Per-layer values (upstream's per-layer keyword tuples, e.g. from layer_schedule): an attn_ / ff_ keyword
# given as a tuple holds one value per self-attention / feed-forward block. Not for the keywords the whole
# stack reads (rotary widths, the cache layout, the TUPE scale, ...): those are one value.
STACK_WIDE = {"attn_dim_head", "attn_kv_heads", "attn_one_kv_head", "attn_inverted_attention", "attn_qk_norm",
              "attn_scale", "attn_selective", "attn_pre_mix", "attn_bias", "ff_dim_out", "ff_glu", "ff_no_bias"}


def layer_schedule(start: float, end: float, depth: int, schedule="cosine") -> tuple[float, ...]:
    """``depth`` values from ``start`` to ``end`` (upstream's helper): ``"linear"``, ``"cosine"``
    (start + (end - start) * (1 - cos(pi t)) / 2) or a function (start, end, t) of t = l / (depth - 1)."""
    import math
    curves = {"linear": lambda a, b, t: a + (b - a) * t,
              "cosine": lambda a, b, t: a + (b - a) * 0.5 * (1 - math.cos(math.pi * t))}
    if not callable(schedule) and schedule not in curves:
        raise ValueError(f"schedule must be 'linear', 'cosine' or a function (start, end, t), got {schedule!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise ValueError(f"layer_schedule needs depth >= 2 (an int), got {depth!r}")
    fn = curves.get(schedule, schedule) if isinstance(schedule, str) else schedule
    return tuple(fn(start, end, i / (depth - 1)) for i in range(depth))


def pop_schedules(kwargs: dict) -> tuple[dict, dict]:
    """(the keywords with each per-layer tuple replaced by its first value, {keyword: the tuple})."""
    from .config import AttentionConfig, FeedForwardConfig, field_names
    fields = {"attn_" + n for n in field_names(AttentionConfig)} | {"ff_" + n for n in field_names(FeedForwardConfig)}
    schedules = {k: tuple(v) for k, v in kwargs.items() if k in fields and isinstance(v, (tuple, list)) and v}
    wide = sorted(set(schedules) & STACK_WIDE)
    if wide:
        raise ValueError(f"{wide[0]} is one value for the whole stack; per-layer tuples are for the other attn_ / ff_ "
                         f"keywords")
    return dict(kwargs, **{k: v[0] for k, v in schedules.items()}), schedules


def per_layer(layout, schedules: dict, kinds=("a", "f")) -> list[dict]:
    """Per block of ``layout``: {keyword: its value} from the schedules (attn_ keywords on self-attention
    blocks, ff_ on feed-forwards), checking that each tuple has one value per block of its kind."""
    counts = {k: sum(s.kind == k for s in layout) for k in kinds}
    for key, values in schedules.items():
        kind = "a" if key.startswith("attn_") else "f"
        if len(values) != counts[kind]:
            what = "self-attention" if kind == "a" else "feed-forward"
            raise ValueError(f"{key} as a tuple needs one value per {what} block: the layout has {counts[kind]}, "
                             f"got {len(values)}")
    seen, out = {"a": 0, "f": 0}, []
    for spec in layout:
        if spec.kind not in seen:
            out.append({})
            continue
        j = seen[spec.kind]
        seen[spec.kind] += 1
        out.append({k: v[j] for k, v in schedules.items() if (k.startswith("attn_")) == (spec.kind == "a")})
    return out


# Upstream's cross_attn_ prefix: an attention option for the cross-attention blocks only, over the attn_ value
# they share with self-attention (a tuple: one value per cross-attention block). The options a block reads
# for itself; the others are read by the whole stack (widths, the cache layout, positions) or only by
# self-attention (windows, CoPE, selective attention, data-dependent ALiBi), and are refused under it.
CROSS_ATTN_OPTIONS = frozenset({
    "dropout", "scale", "talking_heads", "pre_talking_heads", "post_talking_heads", "use_entmax15", "entmax_alpha",
    "learned_entmax_alpha", "sparse_topk", "sparse_topk_straight_through", "softclamp_logits",
    "logit_softclamp_value", "head_learned_sink", "sigmoid", "cog_signed", "l2_distance", "qk_rmsnorm", "k_rmsnorm",
    "value_rmsnorm", "gate_values", "gate_values_rank", "gate_values_headwise", "output_gate", "output_gate_rank",
    "output_gate_headwise", "low_rank_silu_gates", "swiglu_values", "gate_value_heads", "head_scale", "on_attn",
    "zero_init_output", "sublayer_dropout", "hard", "gumbel_softmax", "gumbel_softmax_temp", "gumbel_softmax_hard",
    "inverted_attention", "pre_scale_post_talking_heads", "custom_attn_fn"})


def pop_cross_attn(kwargs: dict) -> tuple[dict, dict]:
    """(the keywords without the cross_attn_<option> ones, {option: a value or a per-cross-block tuple}).
    Keywords that only start so (cross_attn_tokens_dropout, cross_attn_dim_context) stay."""
    from .config import AttentionConfig, field_names
    fields, rest, cross = field_names(AttentionConfig), {}, {}
    for key, value in kwargs.items():
        name = key[len("cross_attn_"):] if key.startswith("cross_attn_") else None
        if name in CROSS_ATTN_OPTIONS:
            cross[name] = tuple(value) if isinstance(value, list) else value
        elif name in fields:
            raise ValueError(f"{key}: attn_{name} is read by the whole stack or only by self-attention, so it cannot "
                             f"be set for the cross-attention blocks alone; give attn_{name}, or one of cross_attn_ "
                             f"{', '.join(sorted(CROSS_ATTN_OPTIONS))}")
        else:
            rest[key] = value
    return rest, cross


def cross_attn_per_block(layout, cross: dict, kwargs: dict, where: str) -> list[dict]:
    """Per cross-attention block of ``layout``: its {option: value} from pop_cross_attn's options, each
    block's checked as the attn_ options over the stack's other keywords ``kwargs`` (types, conflicts)."""
    from .config import split_layer_kwargs
    count = sum(s.kind == "c" for s in layout)
    if cross and not count:
        raise ValueError(f"cross_attn_{next(iter(cross))}: this stack has no cross-attention blocks; set "
                         f"cross_attend=True (or use a CrossAttender)")
    for key, value in cross.items():
        if isinstance(value, tuple) and len(value) != count:
            raise ValueError(f"cross_attn_{key} as a tuple needs one value per cross-attention block ({count}), "
                             f"got {len(value)}")
    blocks = [{k: v[i] if isinstance(v, tuple) else v for k, v in cross.items()} for i in range(count)]
    for opts in blocks if cross else ():
        try:
            split_layer_kwargs(dict(kwargs, **{"attn_" + k: v for k, v in opts.items()}), where)
        except ValueError as e:
            error = type(e)(f"in the cross-attention blocks (cross_attn_ options): {e}")
            error.conflict = getattr(e, "conflict", None)
            raise error from e
    return blocks
