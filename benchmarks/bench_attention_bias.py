"""Attention with a position bias: fused paths against the explicit one, forward + backward.

Times one attention call (and, for learned biases, the bias module that feeds it) at the
ANCHORS.md shape: batch 16, 12 heads, 1024 tokens, head dim 64, causal, bf16. Rows:

  sdpa                 library attend(), no bias (flash / cuDNN via is_causal)
  sdpa+alibi / +t5 / +tupe   library attend() with the bias module's float tensor (SDPA attn_mask)
  flex+alibi           FlexAttention, causal block mask, ALiBi as a score_mod (compiled)
  flex+t5              FlexAttention, T5 table looked up in the score_mod (compiled)
  flex+tupe            FlexAttention, the TUPE bias tensor read in the score_mod (compiled)
  explicit+alibi / +t5 / +tupe   library attend() forced to the explicit backend

The anchor (ANCHORS.md rows: SDPA no bias, flex+ALiBi, SDPA float ALiBi, explicit) is measured in
the same run; the table reports each row against explicit and against sdpa+alibi vs flex+alibi.

  PYTHONPATH=src python benchmarks/bench_attention_bias.py            # the anchor shape (GPU)
  PYTHONPATH=src python benchmarks/bench_attention_bias.py --quick    # a small CPU-sized run

JSON goes to $OUT when set, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import environment, write_result
from x_transformers.attend import attend, attend_backend, choose_backend, AttendRequest
from x_transformers.positional import AlibiPositionalBias, T5RelativePositionBias, TUPEPositionalBias, t5_bucket


def timer(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_cases(b, h, n, d, dtype, device, flex: bool):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(b, h, n, d, device=device, dtype=dtype)
    pos = torch.arange(n, device=device)[None]
    alibi = AlibiPositionalBias(h).to(device)
    t5 = T5RelativePositionBias(h, causal=True).to(device)
    tupe = TUPEPositionalBias(h * d, h, d, max_seq_len=n).to(device)
    scale_tupe = (2 * d) ** -0.5

    def step(out):
        out.backward(grad)
        for p in (q, k, v):
            p.grad = None
        for mod in (t5, tupe):
            mod.zero_grad(set_to_none=True)

    def library(backend, bias_fn=None, scale=None):
        def fn():
            bias = bias_fn() if bias_fn is not None else None
            if bias is not None:
                bias = bias.to(dtype)
            with attend_backend(backend):
                out, _ = attend(q, k, v, causal=True, bias=bias, scale=scale)
            step(out)
        return fn

    biases = {
        "alibi": (lambda: alibi(pos, pos), None),
        "t5": (lambda: t5(pos, pos), None),
        "tupe": (lambda: tupe(pos, pos), scale_tupe),
    }
    cases = {"sdpa": library("sdpa")}
    for name, (bias_fn, scale) in biases.items():
        cases[f"sdpa+{name}"] = library("sdpa", bias_fn, scale)

    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = create_block_mask(lambda b_, h_, qi, ki: ki <= qi, None, None, n, n, device=device)
        slopes = alibi.slopes.view(h).to(torch.float32)
        # T5: the bucket of every offset k - q, computed once; the learned table read per score
        offsets = torch.arange(-(n - 1), n, device=device)
        bucket_of_offset = t5_bucket(offsets, bidirectional=False, num_buckets=t5.num_buckets,
                                     max_distance=t5.max_distance)

        def flex_case(score_mod_factory, scale=None):
            def fn():
                score_mod = score_mod_factory()
                out = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
                step(out)
            return fn

        def alibi_mod():
            def mod(score, b_, h_, qi, ki):
                return score - slopes[h_] * (qi - ki).abs()
            return mod

        def t5_mod():
            table = t5.relative_attention_bias.weight  # (buckets, h), gradient flows to it

            def mod(score, b_, h_, qi, ki):
                return score + table[bucket_of_offset[ki - qi + n - 1], h_]
            return mod

        def tupe_mod():
            bias = tupe(pos, pos)[0]  # (h, n, n)

            def mod(score, b_, h_, qi, ki):
                return score + bias[h_, qi, ki]
            return mod

        cases["flex+alibi"] = flex_case(alibi_mod)
        cases["flex+t5"] = flex_case(t5_mod)
        cases["flex+tupe"] = flex_case(tupe_mod, scale_tupe)

    for name, (bias_fn, scale) in biases.items():
        cases[f"explicit+{name}"] = library("explicit", bias_fn, scale)
    return cases, q, k, v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape, float32, few iterations (CPU)")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        b, h, n, d, dtype, warmup, iters = 2, 4, 128, 32, torch.float32, 2, args.iters or 5
    else:
        b, h, n, d, dtype, warmup, iters = 16, 12, 1024, 64, torch.bfloat16, 10, args.iters or 50
    flex = device.type == "cuda"  # FlexAttention has no backward on CPU; its rows are GPU-only
    cases, q, k, v = make_cases(b, h, n, d, dtype, device, flex)

    # which kernel the library's sdpa rows really hit is up to PyTorch; record the dispatch choice
    req = AttendRequest(q=q, k=k, v=v, causal=True, bias=torch.zeros(1, h, n, n, device=device, dtype=dtype))
    results = {}
    for name, fn in cases.items():
        try:
            results[name] = dict(ms=timer(fn, device, warmup, iters))
        except Exception as e:  # noqa: BLE001 - a variant this torch cannot run is reported, not fatal
            results[name] = dict(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def ratio(a, b_):
        ra, rb = results.get(a, {}).get("ms"), results.get(b_, {}).get("ms")
        return None if ra is None or rb is None else rb / ra

    print(f"attention fwd+bwd, b{b} h{h} n{n} d{d} causal {str(dtype).split('.')[-1]} on {device.type}")
    print(f"{'path':<16}{'ms':>10}{'explicit/this':>16}")
    for name, r in results.items():
        scheme = name.split("+")[1] if "+" in name else None
        speedup = ratio(name, f"explicit+{scheme}") if scheme else None
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "n/a"
        print(f"{name:<16}{ms:>10}{(f'{speedup:.2f}x' if speedup else ''):>16}" + (f"  {r['error']}" if "error" in r else ""))
    summary = {f"flex_over_sdpa_{s}": ratio(f"sdpa+{s}", f"flex+{s}") for s in ("alibi", "t5", "tupe")}
    for key, val in summary.items():
        if val is not None:
            print(f"{key}: {val:.3f} (>1: sdpa float bias is faster)")

    record = dict(benchmark="attention_bias", shape=dict(b=b, h=h, n=n, d=d, dtype=str(dtype), causal=True),
                  warmup=warmup, iters=iters, dispatch_with_bias=choose_backend(req).name, results=results,
                  summary=summary, anchor_h200_ms={"sdpa": 0.48, "flex+alibi": 0.88, "sdpa+alibi": 0.90,
                                                   "explicit+alibi": 2.94}, **environment())
    print(f"wrote {write_result('attention_bias' + ('_quick' if args.quick else ''), record)}")


if __name__ == "__main__":
    main()
