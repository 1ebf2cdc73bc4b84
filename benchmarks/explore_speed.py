"""Speed exploration for one device call: many training-step variants, time-boxed, with profiles.

Not a result of record (bench_train.py is): this decides which variant bench_train should run.
Each variant is (shape, bench_train mode, loss); ``--only`` picks some by name. Writes
explore_<tag>.json and profile_*.txt to $OUT (or benchmarks/results/).

    PYTHONPATH=src python benchmarks/explore_speed.py --budget-s 520

Modes are bench_train's COMPILE_MODES (model, compiled, cudagraphs, autotune, eager); the labels
keep the names of the committed round-4 results (step = forward + loss compiled as one function).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import measure  # noqa: E402
from common import environment, matmul_peak_tflops, print_table, sync, timed, write_result  # noqa: E402

def categorize(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("fmha", "flash", "sdpa", "attention", "fort_native", "cudnn")):
        return "attention"
    if any(s in n for s in ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "triton_tem", "mm_")):
        return "matmul"
    if "adam" in n or "foreach" in n or "multi_tensor" in n:
        return "optimizer"
    if "softmax" in n or "cross_entropy" in n or "nll" in n:
        return "loss/softmax"
    if n.startswith("triton_") or "elementwise" in n or "reduce" in n or "norm" in n or "copy" in n:
        return "elementwise/norm"
    return "other"


def profile(step, label, out_dir, steps=2):
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall = (time.perf_counter() - t) / steps
    # device-side rows only; a user annotation (e.g. "Optimizer.step#AdamW.step") spans kernels
    # that are listed on their own, so counting it would count them twice
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False) and "#" not in e.key]
    cats: dict[str, float] = {}
    for e in kernels:
        cat = categorize(e.key)
        cats[cat] = cats.get(cat, 0.0) + e.self_device_time_total / 1e3 / steps
    busy = sum(cats.values())
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    if out_dir:
        Path(out_dir, f"profile_{label}.txt").write_text(
            f"wall ms/step {wall * 1e3:.2f}, kernel ms/step {busy:.2f}\n{json.dumps(cats, indent=1)}\n{table}")
    return {"profile_wall_ms": wall * 1e3, "kernel_ms": busy, "by_category_ms": {k: round(v, 3) for k, v in cats.items()}}


def gemm_floor(peak):
    """Milliseconds the GPT-2-shape step's matrix products (forward and both backward products)
    take alone at their own shapes, and SDPA causal attention forward+backward: the floor of a step."""
    if not torch.cuda.is_available():
        return {}
    M, d, V, L = 16 * 1024, 768, 50304, 12
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # (in, out) per layer
    total, detail = 0.0, {}

    def mm_ms(m, k, n):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        return timed(lambda: a @ b, warmup=3, steps=20) * 1e3

    for k, n in shapes:
        ms = mm_ms(M, k, n) + mm_ms(M, n, k) + mm_ms(k, M, n)  # y = xW, dx = dy W^T, dW = x^T dy
        detail[f"{k}x{n}"] = ms
        total += L * ms
    head = mm_ms(M, d, V) + mm_ms(M, V, d) + mm_ms(d, M, V)
    detail["head"] = head
    q = torch.randn(16, 12, 1024, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k_, v_ = (torch.randn_like(q, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)

    def attn():
        o = torch.nn.functional.scaled_dot_product_attention(q, k_, v_, is_causal=True)
        o.backward(do)
    att = timed(attn, warmup=3, steps=20) * 1e3
    detail["attention_per_layer"] = att
    return {"gemm_ms_layers": total, "gemm_ms_head": head, "attention_ms": L * att,
            "floor_ms": total + head + L * att, "detail_ms": detail}


# (label, shape, bench_train mode, loss, extra layer kwargs, profile?); labels as in the committed
# round-4 results: "model" = module-only compile, "step" = forward + loss compiled, "-cg" = CUDA
# graphs, "-at" = max-autotune
VARIANTS = [
    ("gpt2:model:fused", "gpt2", "model", "fused", None, True),
    ("gpt2:step:plain", "gpt2", "compiled", "plain", None, True),
    ("seed:model:fused", "seed", "model", "fused", None, True),
    ("seed:step:plain", "seed", "compiled", "plain", None, False),
    ("seed:step-cg:plain", "seed", "cudagraphs", "plain", None, True),
    ("llama:step:plain", "llama", "compiled", "plain", None, False),
    ("gpt2:step:fused", "gpt2", "compiled", "fused", None, False),
    ("gpt2:step-cg:plain", "gpt2", "cudagraphs", "plain", None, False),
    ("t5:eager:sdpa", "gpt2", "eager", "fused", dict(rel_pos_bias=True), False),
    ("t5:step:sdpa", "gpt2", "compiled", "fused", dict(rel_pos_bias=True), True),
    ("plain:eager", "gpt2", "eager", "fused", None, False),
    ("gpt2:step-at:plain", "gpt2", "autotune", "plain", None, False),
]
COST_S = {"model": 60, "compiled": 60, "cudagraphs": 75, "autotune": 240, "eager": 20}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--budget-s", type=float, default=520)
    p.add_argument("--only", default="", help="comma list of variant labels")
    p.add_argument("--tag", default="explore")
    p.add_argument("--no-floor", action="store_true")
    args = p.parse_args()
    t0 = time.time()
    torch._dynamo.config.cache_size_limit = 64
    out_dir = os.environ.get("OUT")
    peak = matmul_peak_tflops()
    result = {"env": environment(), "matmul_peak_tflops": peak, "rows": []}
    if not args.no_floor:
        result["floor"] = gemm_floor(peak)
        print("floor", json.dumps(result["floor"]), flush=True)
    only = {s for s in args.only.split(",") if s}
    quick = not torch.cuda.is_available()
    for label, shape, mode, loss, extra, prof in VARIANTS:
        if only and label not in only:
            continue
        left = args.budget_s - (time.time() - t0)
        if left < COST_S[mode]:
            result["rows"].append({"label": label, "error": f"skipped: {left:.0f} s left"})
            continue
        inspect = (lambda step, row: profile(step, row["label"].replace(":", "_"), out_dir)) if prof and not quick else None
        try:
            row = measure("ours", shape, quick, mode, peak, extra, None, label, loss=loss, inspect=inspect)
        except Exception as e:  # noqa: BLE001 - a failed variant is reported, the rest still run
            row = {"label": label, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            traceback.print_exc()
        row["elapsed_s"] = time.time() - t0
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_result(args.tag, result)
    print_table(result["rows"], ["label", "tokens_per_s", "ms_per_step", "mfu", "peak_gib", "first_step_s",
                                 "kernel_ms", "profile_wall_ms", "error"])
    print("wrote", write_result(args.tag, result))


if __name__ == "__main__":
    main()
