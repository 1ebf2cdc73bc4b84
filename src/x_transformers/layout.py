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
