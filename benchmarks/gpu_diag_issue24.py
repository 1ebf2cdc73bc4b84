"""GPU diagnosis for issue 24: repeat the compile of one configuration many times in one process
(inductor caches off, so every repetition compiles and autotunes afresh) and record, per
repetition, the compiled step's loss before and after ``backward``, every parameter's relative
gradient error against eager on the first and second call, and which way inductor's autotuner
protected the buffers a kernel mutates (cloned on the GPU, or copied to the CPU and restored).

Modes switch one suspect off at a time:

- ``default``: as ``xtransformers train --compile`` runs;
- ``always_clone``: the autotuner never takes its copy-to-CPU-and-restore path;
- ``deterministic``: ``torch._inductor.config.deterministic`` (no benchmarking of configs);
- ``no_pointwise_autotune``: ``torch._inductor.config.triton.autotune_pointwise = False``;
- ``barrier_fix``: ``x_transformers.inductor_fix`` applied (the fix).

``--force`` makes every LayerNorm kernel run with the config that all wrong compilations had
(R0_BLOCK 2048, 16 warps), so one repetition shows what 1 in 11 shows unforced.

    PYTHONPATH=src python benchmarks/gpu_diag_issue24.py --mode default --config untied_ignored_depth4 --reps 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402
from gpu_check_chunked_loss import BASE, CONFIGS, batch, build, loss_fns, rel_errors  # noqa: E402

MODES = ("default", "always_clone", "deterministic", "no_pointwise_autotune", "no_online_softmax",
         "no_mix_order_reduction", "no_split_reductions", "barrier_fix")


def _is_forced(config, forced: tuple[int, int]) -> bool:
    return config.kwargs.get("R0_BLOCK") == forced[0] and config.num_warps == forced[1]


def instrument_autotuner(mode: str, forced: tuple[int, int] | None = None) -> dict:
    """Count how the autotuner protected mutated buffers (and, in always_clone, force cloning).
    With ``forced`` = (R0_BLOCK, warps), every LayerNorm kernel that has that config among its
    candidates runs with it, instead of the one autotuning would pick."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    counts = {"benches": 0, "cpu_restore": 0, "cpu_restore_bytes": 0, "chosen": {}, "forced": 0}
    original = CachingAutotuner.copy_args_to_cpu_if_needed
    original_tune = CachingAutotuner.autotune_to_one_config

    def recorded_tune(self, *args, **kwargs):  # which config won, per kernel
        name = self.inductor_meta.get("kernel_name", "")
        if forced and "native_layer_norm" in name:
            keep = [launcher for launcher in self.launchers if _is_forced(launcher.config, forced)]
            if keep:
                self.launchers = keep
                counts["forced"] += 1
        out = original_tune(self, *args, **kwargs)
        c = self.launchers[0].config
        counts["chosen"][self.inductor_meta.get("kernel_name", "?")] = (
            f"{c.kwargs} w{c.num_warps} s{c.num_stages}")
        return out

    CachingAutotuner.autotune_to_one_config = recorded_tune

    def counted(self, *args, **kwargs):
        counts["benches"] += 1
        copies = {} if mode == "always_clone" else original(self, *args, **kwargs)
        if copies:
            counts["cpu_restore"] += 1
            counts["cpu_restore_bytes"] += sum(c.numel() * c.element_size() for _, c in copies.values())
        return copies

    CachingAutotuner.copy_args_to_cpu_if_needed = counted
    return counts


def one_call(model, fn, x, target):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(x, target)
    before = loss.item()
    loss.backward()
    after = loss.item()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return before, after, grads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=MODES, default="default")
    ap.add_argument("--config", default="untied_ignored_depth4", choices=list(CONFIGS))
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--force", action="store_true",
                    help="run every LayerNorm kernel with R0_BLOCK 2048 and 16 warps where that is a candidate "
                         "(the config all wrong compilations had)")
    ap.add_argument("--keep-code", action="store_true",
                    help="also write a tarball of the generated code of 2 right and 2 wrong compilations")
    args = ap.parse_args()

    import torch._inductor.config as ic
    ic.force_disable_caches = True
    if args.mode == "deterministic":
        ic.deterministic = True
    if args.mode == "no_pointwise_autotune":
        ic.triton.autotune_pointwise = False
    if args.mode == "no_online_softmax":
        ic.online_softmax = False
    if args.mode == "no_mix_order_reduction":
        ic.triton.mix_order_reduction = False
    if args.mode == "no_split_reductions":
        ic.split_reductions = False
    from x_transformers import inductor_fix
    if args.mode == "barrier_fix":
        print("inductor_fix needed:", inductor_fix.needed(), "applied:", inductor_fix.apply(), flush=True)
    else:  # importing x_transformers guards compilation: diagnose torch's own code generation
        inductor_fix.remove()
    counts = instrument_autotuner(args.mode, (2048, 16) if args.force else None)

    cfg = {**BASE, **CONFIGS[args.config]}
    model = build(cfg)
    x, target = batch(cfg)
    fns = loss_fns(model)
    e_before, _, eager = one_call(model, fns["eager_flat"](), x, target)
    from torch._inductor.graph import GraphLowering

    compiled_files: list[str] = []  # every module inductor writes, in order
    original_compile = GraphLowering.compile_to_module

    def recording_compile(self):
        mod = original_compile(self)
        compiled_files.append(getattr(mod, "__file__", None) or "")
        return mod

    GraphLowering.compile_to_module = recording_compile

    reps, t0, kept = [], time.perf_counter(), {"wrong": [], "right": []}
    for rep in range(args.reps):
        if time.perf_counter() - t0 > args.budget_s:
            break
        torch._dynamo.reset()
        before_counts = {k: v for k, v in counts.items() if k != "chosen"}
        counts["chosen"] = {}
        n_modules = len(compiled_files)
        fn = fns["compiled_flat"]()
        row = {"rep": rep}
        for call in (1, 2):
            b, a, grads = one_call(model, fn, x, target)
            errs, missing = rel_errors(grads, eager)
            worst = sorted(errs.items(), key=lambda kv: -kv[1])[:4]
            row[f"call{call}"] = {"loss_before_backward_vs_eager": b - e_before, "loss_after_backward_vs_eager": a - e_before,
                                  "worst": [[n, round(v, 4)] for n, v in worst], "missing": missing}
        row["autotune"] = {k: counts[k] - before_counts[k] for k in before_counts}
        row["chosen"] = dict(counts["chosen"])
        row["wrong"] = abs(row["call1"]["loss_before_backward_vs_eager"]) > 0.01 or row["call1"]["worst"][0][1] > 0.02
        files = compiled_files[n_modules:]
        row["code"] = [Path(f).name for f in files]
        row["barriers"] = sum(Path(f).read_text().count("tl.debug_barrier()") for f in files if f and Path(f).exists())
        kind = "wrong" if row["wrong"] else "right"
        if len(kept[kind]) < 2:
            kept[kind].append((rep, files))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        reps.append(row)
        print(args.mode, json.dumps(row), flush=True)
    out = {"env": environment(), "mode": args.mode, "forced": args.force, "config": cfg, "eager_loss": e_before, "reps": reps,
           "wrong": sum(r["wrong"] for r in reps), "of": len(reps)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"diag24_{args.config}_{args.mode}{'_forced' if args.force else ''}_{os.getpid()}.json").write_text(json.dumps(out, indent=1))
    print(args.mode, "forced" if args.force else "", "wrong", out["wrong"], "of", out["of"])
    if not args.keep_code:
        return
    with tarfile.open(args.out / f"diag24_code_{args.mode}_{os.getpid()}.tar.gz", "w:gz") as tar:
        for kind, entries in kept.items():
            for rep, files in entries:
                for f in files:
                    if f and Path(f).exists():
                        tar.add(f, arcname=f"{kind}_rep{rep}/{Path(f).name}")


if __name__ == "__main__":
    main()
