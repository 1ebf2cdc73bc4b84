"""What each attention variant of issue 20 costs a training step, on the path users call:
``torch.compile(AutoregressiveWrapper(lm))``, bf16 autocast, fused AdamW, GPT-2-small shape (vocab
50304, dim 768, depth 12, heads 12, seq 1024). The plain model is timed in the same run and is the
anchor of the cost ratio. For each case the row records the backend the dispatcher picked for its
attention (from one eager forward) and, for every backend ahead of it in priority order, the
dispatcher's reasons for passing it over; dynamo's graph-break count; any warning raised while
compiling and stepping (flex's "unfused implementation" warning among them); and, with --profile,
the attention kernels one profiled step launched (flash / cuDNN / memory-efficient SDPA, or flex's
Triton template ``triton_tem_fused_*``), which is what actually ran inside the compiled graph.

    PYTHONPATH=src python benchmarks/bench_attn_variants.py [--batch 16] [--cases plain,softcap,...]
        [--warmup 3] [--steps 10] [--profile] [--json PATH]

Any case that fails (an exception, a non-finite loss) is recorded with its error, the others still
run, and the script exits 1. Output: $OUT/attn_variants_gpu.json (benchmarks/results/ without $OUT).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, print_table, write_result  # noqa: E402

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper  # noqa: E402
from x_transformers.attend import attend_backend  # noqa: E402

attend_module = importlib.import_module("x_transformers.attend")
importlib.import_module("x_transformers.flex")  # registers the flex backend ahead of sdpa

VOCAB, DIM, DEPTH, HEADS = 50304, 768, 12, 12
QUICK = dict(vocab=256, dim=64, depth=2, heads=2)  # --quick: a CPU check of the script itself, no timing meaning
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# case: (the layer keywords, what the row measures)
CASES = {
    "plain": ({}, "the anchor: causal softmax attention"),
    "softcap": (dict(attn_softclamp_logits=True), "Gemma 2 logit softcapping, 50 tanh(logits / 50)"),
    "sliding_window": (dict(attn_max_attend_past=256), "each query sees 256 keys back"),
    "sinks": (dict(attn_head_learned_sink=True), "a learned per-head sink logit (gpt-oss)"),
    "gate_values": (dict(attn_gate_values=True), "a sigmoid gate from x on the heads' output"),
    "value_residual": (dict(add_value_residual=True), "the first layer's values mixed into every layer's"),
    # the sink as before issue 20's flex path: a zero key whose bias column is the sink, on SDPA (forced)
    "sinks_sdpa_column": (dict(attn_head_learned_sink=True), "the sink as a dense bias column on SDPA (forced)"),
}
FORCED = {"sinks_sdpa_column": "sdpa"}
DEFAULT_CASES = "plain,sinks,softcap,sliding_window,gate_values,sinks_sdpa_column"
OPTIONAL = {"gate_values", "value_residual", "sinks_sdpa_column"}  # skipped for --budget-s without failing the run
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "efficient_attention", "cudnn", "attention", "tem_fused", "flex")


def dispatch_record(lm, x) -> dict:
    """The backend(s) attend() picked in one eager forward, and the reasons it gave for passing over
    each backend ahead of the picked one (the dispatcher's own words)."""
    picked, passed_over = [], {}
    original = attend_module.choose_backend

    def spy(req, *a, **k):
        backend = original(req, *a, **k)
        if backend.name not in picked:
            picked.append(backend.name)
        for name, reasons in attend_module.rejection_reasons(req).items():
            if name == backend.name:
                break
            passed_over.setdefault(name, reasons)
        return backend

    attend_module.choose_backend = spy
    try:
        with torch.no_grad(), torch.autocast(DEV, torch.bfloat16):
            lm(x[:, :-1])
    finally:
        attend_module.choose_backend = original
    return dict(picked=picked, passed_over=passed_over)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def attention_kernels(step) -> dict:
    """CUDA kernel names (with total microseconds) of one profiled step that look like attention."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    found = {}
    for ev in prof.key_averages():
        name = ev.key
        if any(w in name.lower() for w in ATTENTION_KERNEL_WORDS):
            us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            found[name[:120]] = round(float(us), 1)
    return dict(sorted(found.items(), key=lambda kv: -kv[1])[:8])


def run_case(name: str, a) -> dict:
    kw, what = CASES[name]
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters = importlib.import_module("torch._dynamo.utils").counters
    counters.clear()
    s = a.shape
    lm = TransformerWrapper(num_tokens=s["vocab"], max_seq_len=a.seq,
                            attn_layers=Decoder(dim=s["dim"], depth=s["depth"], heads=s["heads"], **kw)).to(DEV)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, s["vocab"], (a.batch, a.seq + 1), device=DEV)
    force = FORCED.get(name)
    with attend_backend(force):
        row = dict(case=name, what=what, keywords=kw, forced=force, **dispatch_record(lm, x))
    model = torch.compile(AutoregressiveWrapper(lm))
    losses = []

    def step():
        with torch.autocast(DEV, torch.bfloat16):
            loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught, attend_backend(force):
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        step()  # compiles
        sync()
        row["first_step_s"] = round(time.perf_counter() - t0, 1)
        for _ in range(a.warmup - 1):
            step()
        times = []
        for _ in range(a.steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        if a.profile and DEV == "cuda":
            row["attention_kernels"] = attention_kernels(step)
    final = [float(v) for v in torch.stack(losses).float().cpu()]
    if not all(math.isfinite(v) for v in final):
        raise FloatingPointError(f"non-finite training loss: {final}")
    ms = sorted(times)[len(times) // 2] * 1e3
    row.update(step_ms=round(ms, 2), mean_step_ms=round(sum(times) / len(times) * 1e3, 2),
               tokens_per_s=round(a.batch * a.seq / ms * 1e3), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV == "cuda" else None,
               loss_first=round(final[0], 4), loss_last=round(final[-1], 4),
               graph_breaks=int(sum(counters["graph_break"].values())),
               warnings=sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})[:10])
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="from " + ", ".join(CASES) + f" (default {DEFAULT_CASES})")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing, the compiling one included")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--profile", action="store_true", help="profile one more step: the attention kernels that ran")
    p.add_argument("--budget-s", type=float, help="start no case that would end after this many seconds (judged by "
                                                   "the slowest case so far); a skipped required case is a failure")
    p.add_argument("--quick", action="store_true", help="tiny shape, seq 64, batch 2: checks the script (CPU)")
    p.add_argument("--json", help="output path (default $OUT or benchmarks/results/attn_variants_gpu.json)")
    a = p.parse_args()
    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if a.quick:
        a.seq, a.batch = 64, 2
    a.shape = QUICK if a.quick else dict(vocab=VOCAB, dim=DIM, depth=DEPTH, heads=HEADS)
    if unknown or (DEV != "cuda" and not a.quick) or a.warmup < 1 or a.steps < 1:
        print(f"unknown cases {unknown}" if unknown else "needs CUDA (or --quick), --warmup >= 1 and --steps >= 1",
              file=sys.stderr)
        return 2
    if "plain" not in names:
        names.insert(0, "plain")  # the anchor of every ratio, measured in the same run
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows, failed = [], []

    def save():  # after every case: a time limit that kills the script keeps the cases already measured
        plain = next((r for r in rows if r["case"] == "plain" and "step_ms" in r), None)
        for r in rows:
            if plain and "step_ms" in r:
                r["cost_vs_plain"] = round(r["step_ms"] / plain["step_ms"], 3)
        out = dict(benchmark="attention variants (issue 20): compiled AutoregressiveWrapper training step",
                   path="torch.compile(AutoregressiveWrapper(lm)), bf16 autocast, fused AdamW",
                   shape=dict(a.shape, batch=a.batch, seq=a.seq), warmup=a.warmup, timed_steps=a.steps,
                   **environment(), cases=names, failed=failed, complete=len(rows) == len(names), rows=rows)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
            return a.json
        return write_result("attn_variants", out)

    started, slowest, skipped = time.perf_counter(), 0.0, []
    for name in names:
        t = time.perf_counter()
        if a.budget_s and t - started + slowest > a.budget_s:
            skipped.append(name)
            print(f"skipped (time budget {a.budget_s:g} s): {name}", file=sys.stderr, flush=True)
            if name not in OPTIONAL:
                failed.append(name)
            rows.append(dict(case=name, keywords=CASES[name][0], error=f"skipped: time budget {a.budget_s:g} s"))
            path = save()
            continue
        try:
            row = run_case(name, a)
        except Exception as e:  # noqa: BLE001: record it, run the others, exit non-zero at the end
            traceback.print_exc()
            row = dict(case=name, keywords=CASES[name][0], error=f"{type(e).__name__}: {str(e)[:600]}")
            failed.append(name)
        row["case_s"] = round(time.perf_counter() - t, 1)
        slowest = max(slowest, row["case_s"])
        rows.append(row)
        print({k: v for k, v in row.items() if k not in ("passed_over", "warnings")}, flush=True)
        path = save()
    print_table(rows, ["case", "picked", "step_ms", "tokens_per_s", "cost_vs_plain", "peak_mem_gib", "graph_breaks",
                       "first_step_s", "error"])
    print(f"wrote {path}")
    if failed:
        print(f"FAILED cases: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
