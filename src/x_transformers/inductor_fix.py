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
iteration there, and touches nothing on CPU.

Importing ``x_transformers`` calls :func:`install`: where a GPU is present, the barrier is applied
as soon as inductor's Triton code generation is imported (by the first compilation), so a user's own
``torch.compile(AutoregressiveWrapper(lm))`` is guarded as well as the training command and
``generate(compile=True)``. Set ``XT_INDUCTOR_FIX=0`` to leave torch's code generation untouched
(:func:`remove` undoes both the hook and the barrier in a running process).
"""

from __future__ import annotations

import importlib.abc
import inspect
import os
import sys

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


_TARGET = "torch._inductor.codegen.triton"  # the module whose TritonKernel.load is guarded


def _gpu_present() -> bool:
    return torch.cuda.is_available()


def _on_codegen_import() -> None:
    if _gpu_present():
        apply()


class _ApplyOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`_on_codegen_import` right after inductor's Triton code generation is imported
    (the first GPU compilation imports it), so the library's import stays light and no later
    ``torch._dynamo.reset()`` can drop the guard."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_guard(module):
            exec_module(module)
            _unhook()
            _on_codegen_import()

        spec.loader.exec_module = exec_then_guard
        return spec


_FINDER = _ApplyOnImport()


def _unhook() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> bool:
    """Guard every ``torch.compile`` of this process on GPUs: apply the barrier now if inductor's
    Triton code generation is loaded, else the moment it is. Importing ``x_transformers`` calls
    this. False where ``XT_INDUCTOR_FIX=0`` opts out."""
    if os.environ.get("XT_INDUCTOR_FIX", "1") == "0":
        return False
    if _TARGET in sys.modules:
        _on_codegen_import()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True


def remove() -> None:
    """Undo :func:`install` and :func:`apply`: torch's own code generation again (for diagnosis)."""
    global _APPLIED
    _unhook()
    cls = _kernel_class() if _APPLIED else None
    if cls is not None and hasattr(cls.load, "__wrapped__"):
        cls.load = cls.load.__wrapped__
    _APPLIED = False


__all__ = ["apply", "barrier_before_readback", "install", "maybe_apply", "needed", "remove"]
