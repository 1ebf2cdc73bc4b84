"""A guard against a read-after-write race in kernels that torch.compile generates on GPUs.

Inductor can fuse a LayerNorm whose normalised input is kept for backward into one Triton
kernel with several loops over the row: one loop stores the normalised values, a later loop
reads them back to apply the weight and bias. Nothing orders the two: with some block sizes
(chosen by autotuning, so only in some compilations) the store and the read-back of an element
fall on different warps, and a warp can read the element before it is written. The result is a
wrong forward and wrong gradients near the output, different from one compilation to the next
(issue 24 here; pytorch/pytorch#190517, fixed upstream by a barrier before such a read-back).

:func:`apply` adds that barrier to torch's Triton code generation when the installed torch lacks
it: before a load of a buffer that the kernel stored in an earlier loop, ``tl.debug_barrier()``.
It changes generated code only where that pattern occurs, costs one block-wide barrier per loop
iteration there, and touches nothing on CPU. The training command and ``generate(compile=True)``
apply it; call it yourself before ``torch.compile`` elsewhere.
"""

from __future__ import annotations

import inspect

import torch

_APPLIED = False


def _kernel_class():
    try:
        from torch._inductor.codegen.triton import TritonKernel
    except Exception:  # noqa: BLE001 - no inductor / triton codegen in this torch: nothing to guard
        return None
    return TritonKernel


def needed() -> bool:
    """Whether the installed torch's Triton kernels lack the read-back barrier."""
    cls = _kernel_class()
    if cls is None:
        return False
    try:
        source = inspect.getsource(cls.load)
    except (OSError, TypeError):
        return False
    return "invalidated_stores" not in source


def barrier_before_readback(kernel, name: str) -> bool:
    """Write ``tl.debug_barrier()`` into ``kernel``'s loads if ``name`` was stored by an earlier
    loop of the kernel (inductor's ``cse.invalidated_stores``: stored, then a loop boundary), so
    every warp's store lands before any warp reads it back. True if a barrier was written."""
    cse, loads = getattr(kernel, "cse", None), getattr(kernel, "loads", None)
    if cse is None or loads is None or name not in getattr(cse, "invalidated_stores", ()):
        return False
    loads.writeline("tl.debug_barrier()")
    return True


def maybe_apply(device) -> bool:
    """:func:`apply` where ``device`` is a CUDA (or other Triton GPU) device; nothing on CPU."""
    return apply() if torch.device(device).type in ("cuda", "xpu") else False


def apply() -> bool:
    """Add the barrier (once per process); True if torch's code generation is now guarded."""
    global _APPLIED
    if _APPLIED:
        return True
    cls = _kernel_class()
    if cls is None or not needed():
        return cls is not None
    original = cls.load

    def load(self, name, index):
        barrier_before_readback(self, name)
        return original(self, name, index)

    load.__wrapped__ = original
    cls.load = load
    _APPLIED = True
    return True


__all__ = ["apply", "barrier_before_readback", "maybe_apply", "needed"]
