"""QK-clip (MuonClip, Kimi K2, 2507.20534): after an optimizer step, where a head's largest
pre-softmax logit exceeds ``tau``, scale its query and key projections down so that it becomes ``tau``.
``Attention.qk_clip_`` clips one module; :func:`qk_clip_blocks` a stack's modules from a forward's
recorded maxima (``Intermediates.attn_logit_maxes``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def clip_attention_(attn, pre_softmax_attn, tau: float = 100.0):
    """``attn.qk_clip_``: each by the square root of the factor; with grouped key/values, whose keys
    several heads share, the query alone by the whole factor."""
    if not isinstance(pre_softmax_attn, torch.Tensor):
        pre_softmax_attn = pre_softmax_attn.pre_softmax_attn
    if attn.to_k is None or attn.to_latent_q is not None or attn.to_latent_kv is not None or attn.qk_norm:
        raise ValueError("qk_clip_ scales to_q and to_k: not with shared-QK, latent projections or QK-norm "
                         "(whose logits the weights' scale does not set)")
    top = pre_softmax_attn if pre_softmax_attn.ndim == 1 else pre_softmax_attn.amax(dim=(0, 2, 3))  # (h,)
    factor = (tau / top.float()).clamp(max=1.0)  # 1 where a head stays under tau
    q_scale = factor.sqrt() if attn.kv_heads == attn.heads else factor
    scales = [(attn.to_q, q_scale)] + [(attn.to_k, factor.sqrt())] * (attn.kv_heads == attn.heads)
    for proj, scale in scales:
        per_row = scale.repeat_interleave(attn.dim_head)
        proj.weight.mul_(per_row[:, None].to(proj.weight.dtype))
        if proj.bias is not None:
            proj.bias.mul_(per_row.to(proj.bias.dtype))
    attn._qkv_memo = None


def qk_clip_blocks(modules: list, maxes: list | None, tau: float):
    """QK-clip over a stack: ``modules`` its Attention blocks in run order, ``maxes`` each call's (h,)
    largest logits in the same order (``Intermediates.attn_logit_maxes``). A module run twice (tied
    weights) is clipped once, by its larger maxima."""
    if maxes is None:
        raise ValueError("these intermediates hold no attention logits: take them from a training forward "
                         "(model.train(), gradients on) with return_intermediates=True")
    if len(maxes) != len(modules):
        raise ValueError(f"the intermediates hold {len(maxes)} attention calls' logits but the stack has "
                         f"{len(modules)} attention blocks in its run (recycling, loops or repeat_blocks run some "
                         f"more than once); clip each Attention with qk_clip_")
    tops: dict[int, tuple] = {}
    for module, top in zip(modules, maxes):
        seen = tops.get(id(module))
        tops[id(module)] = (module, top if seen is None else torch.maximum(seen[1], top))
    for module, top in tops.values():
        module.qk_clip_(top, tau)
