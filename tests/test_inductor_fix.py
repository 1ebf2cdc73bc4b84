"""The guard against inductor's read-back race (issue 24): what it writes into a kernel, when, and
that the compiled paths of this package install it on GPU only. The race itself needs a GPU:
benchmarks/gpu_diag_issue24.py measures it (wrong compilations with and without the guard)."""

import pytest
import torch

from x_transformers import inductor_fix


class _Lines:
    def __init__(self):
        self.lines = []

    def writeline(self, line):
        self.lines.append(line)


class _Kernel:
    """The two attributes of inductor's TritonKernel the guard reads."""

    def __init__(self, invalidated):
        self.cse = type("CSE", (), {"invalidated_stores": set(invalidated)})()
        self.loads = _Lines()


def test_a_barrier_precedes_only_the_read_back_of_a_buffer_stored_in_an_earlier_loop():
    kernel = _Kernel(invalidated={"buf7"})
    assert inductor_fix.barrier_before_readback(kernel, "buf7")  # stored in loop 2, read in loop 3
    assert kernel.loads.lines == ["tl.debug_barrier()"]
    assert not inductor_fix.barrier_before_readback(kernel, "in_ptr0")  # a plain input: no barrier
    assert not inductor_fix.barrier_before_readback(object(), "buf7")  # not a Triton kernel: untouched
    assert kernel.loads.lines == ["tl.debug_barrier()"]


@pytest.fixture
def fresh_guard(monkeypatch):
    """apply() on a stand-in kernel class, so the real inductor is left as it was."""
    calls = []

    class Kernel:
        def load(self, name, index):
            calls.append((name, index))
            return f"tmp_{name}"

    monkeypatch.setattr(inductor_fix, "_kernel_class", lambda: Kernel)
    monkeypatch.setattr(inductor_fix, "_APPLIED", False)
    monkeypatch.setattr(inductor_fix, "needed", lambda: True)
    return Kernel, calls


def test_apply_wraps_load_once_and_keeps_what_it_returns(fresh_guard):
    Kernel, calls = fresh_guard
    original = Kernel.load
    assert inductor_fix.apply() and inductor_fix.apply()
    assert Kernel.load.__wrapped__ is original  # wrapped once, not twice
    k = Kernel()
    k.cse, k.loads = _Kernel({"buf1"}).cse, _Lines()
    assert k.load("buf1", 0) == "tmp_buf1" and calls == [("buf1", 0)]
    assert k.loads.lines == ["tl.debug_barrier()"]


def test_a_torch_that_has_the_barrier_is_left_alone(fresh_guard, monkeypatch):
    Kernel, _ = fresh_guard
    original = Kernel.load
    monkeypatch.setattr(inductor_fix, "needed", lambda: False)
    assert inductor_fix.apply()
    assert Kernel.load is original


def test_the_guard_is_installed_for_gpu_devices_only(fresh_guard):
    Kernel, _ = fresh_guard
    original = Kernel.load
    assert not inductor_fix.maybe_apply("cpu") and Kernel.load is original
    assert inductor_fix.maybe_apply(torch.device("cuda", 0)) and Kernel.load is not original


class _WithoutBarrier:
    def load(self, name, index):
        return name


class _WithBarrier:
    def load(self, name, index):
        if name in self.cse.invalidated_stores:  # torch with pytorch/pytorch#190519
            self.loads.writeline("tl.debug_barrier()")
        return name


@pytest.mark.parametrize("cls, want", [(_WithoutBarrier, True), (_WithBarrier, False), (None, False)])
def test_needed_reads_whether_torchs_load_already_guards_read_backs(cls, want, monkeypatch):
    monkeypatch.setattr(inductor_fix, "_kernel_class", lambda: cls)
    assert inductor_fix.needed() is want


def test_importing_the_library_guards_the_first_gpu_compilation_and_never_cpu(fresh_guard, monkeypatch):
    """A user's own torch.compile is guarded: importing x_transformers installs the guard, which
    applies the barrier once inductor's Triton code generation is loaded, only where CUDA is."""
    Kernel, _ = fresh_guard
    original = Kernel.load
    monkeypatch.setattr(inductor_fix, "_gpu_present", lambda: False)
    inductor_fix._on_codegen_import()
    assert Kernel.load is original
    monkeypatch.setattr(inductor_fix, "_gpu_present", lambda: True)
    inductor_fix._on_codegen_import()
    assert Kernel.load.__wrapped__ is original


_IMPORT_PROBE = """
import sys, torch
from x_transformers import inductor_fix
inductor_fix._gpu_present = lambda: True
inductor_fix.needed = lambda: True
assert "torch._inductor.codegen.triton" not in sys.modules
torch._dynamo.reset()  # clears dynamo's callbacks: the guard must not depend on them
from torch._inductor.codegen.triton import TritonKernel
print(hasattr(TritonKernel.load, "__wrapped__"), inductor_fix._FINDER in sys.meta_path)
"""


@pytest.mark.parametrize("opt_out, want", [(None, "True False"), ("0", "False False")])
def test_the_guard_lands_when_inductor_codegen_is_first_imported_unless_opted_out(opt_out, want):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XT_INDUCTOR_FIX"}
    if opt_out is not None:
        env["XT_INDUCTOR_FIX"] = opt_out
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == want


def test_remove_restores_torchs_code_generation(fresh_guard):
    Kernel, _ = fresh_guard
    original = Kernel.load
    inductor_fix.apply()
    inductor_fix.remove()
    assert Kernel.load is original and inductor_fix._FINDER not in __import__("sys").meta_path
