"""Run-time input checks: each raises one line naming the argument and the fix, before any work.

Construction-time checks live in the config dataclasses; these look at what a forward is given.
Two entry points, one per level, so wiring them in is one call each:

- :func:`check_token_inputs` (``TransformerWrapper.check_inputs``): token ids (b, n).
- :func:`check_stack_inputs` (``layers.check_stack_inputs``): embeddings (b, n, dim) and the
  cross-attention ``context``.

Value checks (NaN/inf) cost one reduction and a host sync, so they are skipped while
``torch.compile`` traces (a sync would break the graph). :func:`warn_nonfinite` is for loading
weights.

Legend: b batch, n sequence, m context length.
"""

from __future__ import annotations

import contextlib
import warnings
from contextvars import ContextVar

import torch
from torch import Tensor

try:  # FSDP2's sharded parameters (already imported with torch); absent from builds without distributed
    from torch.distributed.tensor import DTensor
except ImportError:
    DTensor = ()  # isinstance(x, ()) is False

# What generate()'s decode steps vouch for (trusted_inputs): the ids are the model's own samples, and
# the positions stay under max_seq_len by a bound it checked once on the host. The wrapper then skips
# those two checks, each a reduction and a host sync a step on a GPU (the CPU could not run ahead).
_TRUSTED: ContextVar[frozenset] = ContextVar("x_transformers_trusted_inputs", default=frozenset())


@contextlib.contextmanager
def trusted_inputs(*what: str):
    """Within, :func:`trusted` says True for each of ``what`` (``"ids"``, ``"positions"``)."""
    token = _TRUSTED.set(frozenset(what))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def trusted(what: str) -> bool:
    return what in _TRUSTED.get()


def check_mask(mask, b: int, n: int, name: str = "mask"):
    if mask is None:
        return
    if mask.dtype != torch.bool or mask.shape != (b, n):
        raise ValueError(f"{name} must be a bool tensor of shape ({b}, {n}) with True = keep; "
                         f"got {mask.dtype} of shape {tuple(mask.shape)}")


def check_attn_mask(attn_mask, b: int, n: int):
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.ndim != 4 \
            or attn_mask.shape[1] != 1 or attn_mask.shape[2:] != (n, n) or attn_mask.shape[0] not in (1, b):
        got = f"{attn_mask.dtype} of shape {tuple(attn_mask.shape)}" if isinstance(attn_mask, torch.Tensor) \
            else type(attn_mask).__name__
        raise ValueError(f"attn_mask must be a bool tensor of shape ({b} or 1, 1, {n}, {n}), True = may attend; "
                         f"got {got}")


def check_not_empty(x: Tensor, name: str = "x"):
    """An empty batch or a zero-length sequence has nothing to compute; say so before the
    kernels fail (or silently return empty tensors)."""
    if x.ndim >= 1 and x.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); pass at least one row")
    if x.ndim >= 2 and x.shape[1] == 0:
        raise ValueError(f"{name} has zero-length sequences (shape {tuple(x.shape)}); pass at least one token per row")


def _param_dtype(module) -> torch.dtype | None:
    """The dtype the module computes in, or None where that is not its parameters' dtype: no float
    parameter, or parameters sharded by FSDP2 (DTensors), which gathers them in its mixed-precision
    policy's dtype and casts the forward's inputs itself."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None or isinstance(param, DTensor):
        return None
    return param.dtype


def check_dtype(x: Tensor, module, name: str = "x"):
    """Embeddings fed to a stack must have its parameters' dtype (a float64 model takes float64).
    Under autocast the parameters stay float32 and autocast casts per op, so the input may be the
    parameters' dtype or the autocast dtype."""
    want = _param_dtype(module)
    if want is None or x.dtype == want:
        return
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device):
        return
    raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters are {want}; "
                    f"pass {name}.to({want}) or convert the model (model.to({x.dtype}))")


def check_context(context: Tensor | None, batch: int, width: int, name: str = "context"):
    """A cross-attention context must be (batch, m, width) with the queries' batch."""
    if context is None:
        return
    if context.ndim != 3:
        raise ValueError(f"{name} must have shape (batch, ctx_len, {width}), got {tuple(context.shape)}")
    if context.shape[0] != batch:
        raise ValueError(f"{name} has batch {context.shape[0]} but the input has {batch}; "
                         f"pass one context row per input row")
    if context.shape[-1] != width:
        raise ValueError(f"{name} has width {context.shape[-1]} but cross-attention expects {width} "
                         f"(dim_context, or dim); project the context or set dim_context={context.shape[-1]}")
    if context.shape[1] == 0:
        raise ValueError(f"{name} has zero length (shape {tuple(context.shape)}); pass at least one context position")


def check_finite(x: Tensor | None, name: str = "x"):
    """NaN/inf in a continuous input poisons every output it reaches. One pass (aminmax: NaN and
    inf both reach the min or the max) and one sync; skipped while compiling."""
    if x is None or not x.is_floating_point() or x.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = x.detach().aminmax()
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        what = "NaN" if bool(x.isnan().any()) else "inf"
        raise ValueError(f"{name} contains {what}; check the upstream computation (or mask those positions "
                         f"out and replace them with finite values)")


def check_token_inputs(x: Tensor, name: str = "x"):
    """TransformerWrapper's run-time checks beyond dtype/shape: no empty batch or sequence."""
    check_not_empty(x, name)


def check_stack_inputs(stack, x: Tensor, context: Tensor | None = None, *, finite: bool = True):
    """A layer stack's run-time checks: x (b, n, dim) not empty, of the parameters' dtype;
    ``context`` (b, m, dim_context or dim) of the right batch and width; with ``finite`` both
    free of NaN/inf (one host sync: the stacks ask for it only when called on a user's embeddings)."""
    check_not_empty(x, "x")
    check_dtype(x, stack, "x")
    if context is not None:
        width = getattr(stack.cfg, "dim_context", None) or stack.dim
        check_context(context, x.shape[0], width)
        check_dtype(context, stack, "context")
    if finite:
        check_finite(x, "x")
        check_finite(context, "context")


def nonfinite_tensors(tensors) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, from a state dict or a module."""
    items = tensors.state_dict().items() if hasattr(tensors, "state_dict") else tensors.items()
    return [name for name, t in items
            if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def warn_nonfinite(tensors, where: str) -> list[str]:
    """Warn, naming the tensors, when loaded weights hold NaN or inf; returns their names."""
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        warnings.warn(f"{where}: weights with NaN/inf: {shown}; the checkpoint is corrupt or was saved "
                      f"after the loss diverged", stacklevel=3)
    return bad


__all__ = ["check_mask", "check_attn_mask", "check_not_empty", "check_dtype", "check_context", "check_finite", "check_token_inputs",
           "check_stack_inputs", "nonfinite_tensors", "warn_nonfinite"]


def start_mask(seq_start_pos, mask, x, offset: int):
    """Upstream's seq_start_pos (b,): each row's left padding; those columns of x (b, n) become masked."""
    if not isinstance(seq_start_pos, Tensor) or seq_start_pos.shape != (x.shape[0],) \
            or seq_start_pos.dtype.is_floating_point or seq_start_pos.dtype == torch.bool:
        raise ValueError(f"seq_start_pos must be an integer tensor of shape ({x.shape[0]},), each row's count "
                         f"of left padding; got {seq_start_pos!r}")
    cols = offset + torch.arange(x.shape[1], device=x.device)
    start = cols[None, :] >= seq_start_pos.to(x.device)[:, None]
    return start if mask is None else mask & start


def module_kwargs(wrapper, emb_kw, logit_kw, cache):
    """Upstream's token_emb_kwargs / to_logits_kwargs: keywords of a custom token_emb / to_logits module."""
    for name, kw, custom in (("token_emb", emb_kw, wrapper.custom_token_emb),
                             ("to_logits", logit_kw, wrapper.custom_to_logits)):
        if kw and not custom:
            raise ValueError(f"{name}_kwargs are keywords of a custom {name} module; this wrapper built its own")
    if emb_kw and cache is not None:
        raise ValueError("token_emb_kwargs cannot be used with a cache (its per-token inputs are not sliced)")
    return emb_kw or {}, logit_kw or {}


# upstream x-transformers' forward keywords of features this package does not have: why, in a line
UPSTREAM_ABSENT = {
    **dict.fromkeys(("looped_steps", "max_looped_steps", "looped_pred_all_logits", "looped_inference",
                     "looped_exit_prob_threshold"), "the looped LM is TransformerWrapper's (looped=True) and its AutoregressiveWrapper's"),
    "transform_token_embeds": "not implemented; transform_block_inputs={1: fn} transforms the token embeddings",
    "attn_mask": "a full (b, i, j) attention mask is not supported; pass mask= (b, n), True = keep",
    **dict.fromkeys(("cache_age", "seq_pos_offset"), "the new tokens are those after the cache's cache_length"),
    **dict.fromkeys(("rotary_pos_emb", "polar_pos_emb", "attn_bias", "in_attn_cond",
                     "layers_execute_order", "flash_pack_seq_kwargs",
                     "flash_pack_seq_context_kwargs", "return_hiddens", "deep_embeds_and_ids"),
                    "this per-call input of upstream's layer stack is not supported here"),
    "self_attn_kv_residuals": "the wrapper does not pass it on here; call the layer stack (Decoder / Encoder) "
                              "with it",
}


def refuse_upstream(kwargs: dict, where: str):
    """Raise a TypeError for the first keyword left over: an upstream one of a feature absent here
    (saying so), or an unknown one."""
    for key in kwargs:
        if key in UPSTREAM_ABSENT:
            raise TypeError(f"{where}: upstream x-transformers' keyword {key!r} is not supported: {UPSTREAM_ABSENT[key]}")
        raise TypeError(f"{where} got an unexpected keyword {key!r}")
