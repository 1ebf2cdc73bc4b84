"""Attention with a position bias: fused paths against the explicit one, forward + backward.

Times one attention call (and, for learned biases, the bias module that feeds it) at the
ANCHORS.md shape: batch 16, 12 heads, 1024 tokens, head dim 64, causal, bf16. Rows:

  sdpa                 library attend(), no bias (flash / cuDNN via is_causal)
  sdpa+alibi / +t5 / +tupe   library attend() with the bias module's float tensor (SDPA attn_mask)
  flex+alibi           FlexAttention, causal block mask, ALiBi as a score_mod (compiled)
  flex+t5              FlexAttention, T5 table looked up in the score_mod (compiled, the scheme's
                       kernel_options: smaller tiles, one stage; a second, smaller set if that fails)
  flex+tupe            FlexAttention, the TUPE bias tensor read in the score_mod (likewise)
  explicit+alibi / +t5 / +tupe   library attend() forced to the explicit backend

Model rows (what a user gets): a Decoder (dim 768, 12 heads, 1024 tokens, batch 16, depth 1)
forward + backward under bf16 autocast, with each scheme, on auto dispatch (flex where the
dispatcher picks it), forced sdpa, forced flex and forced explicit: model:<scheme>:<path>.
Every row catches its own exception; rows not started within --budget-s are skipped.

The anchor (ANCHORS.md rows: SDPA no bias, flex+ALiBi, SDPA float ALiBi, explicit) is measured in
the same run; the table reports each row against explicit and against sdpa+alibi vs flex+alibi.

  PYTHONPATH=src python benchmarks/bench_attention_bias.py            # the anchor shape (GPU)
  PYTHONPATH=src python benchmarks/bench_attention_bias.py --quick    # a small CPU-sized run

JSON goes to $OUT when set, else benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from common import environment, write_result
from x_transformers.attend import attend, attend_backend, choose_backend, AttendRequest
from x_transformers import Decoder
from x_transformers.positional import (AlibiPositionalBias, T5RelativePositionBias, T5ScoreMod, TUPEPositionalBias,
                                       TUPEScoreMod, t5_bucket)

SCHEMES = {"alibi": dict(alibi_pos_bias=True), "t5": dict(rel_pos_bias=True), "tupe": dict(tupe=True)}


def model_cases(b, n, dim, heads, depth, device, amp_dtype):
    """Model-level rows: a Decoder forward + backward per scheme and attention path."""
    x = torch.randn(b, n, dim, device=device)
    cases = {}
    for scheme, kw in SCHEMES.items():
        if scheme == "tupe":
            kw = dict(kw, tupe_max_seq_len=n)
        layers = Decoder(dim=dim, depth=depth, heads=heads, **kw).to(device)

        def chosen(layers=layers):
            pos = torch.arange(n, device=device)[None]
            sm = layers.rel_pos.score_mod(pos, pos) if layers.rel_pos is not None else None
            sm = layers.tupe.score_mod(pos, pos, sm) if layers.tupe is not None else sm
            d = dim // heads
            z = torch.zeros(b, heads, n, d, device=device, dtype=amp_dtype or torch.float32)
            return choose_backend(AttendRequest(q=z, k=z, v=z, causal=True, score_mod=sm)).name

        for path in ("auto", "sdpa", "flex", "explicit"):
            def fn(layers=layers, path=path):
                amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with attend_backend(None if path == "auto" else path), amp:
                    out = layers(x)
                out.float().square().mean().backward()
                layers.zero_grad(set_to_none=True)
            cases[f"model:{scheme}:{path}"] = (fn, chosen)
    return cases


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
    """Kernel-level rows: name -> (fn, fallback fn or None)."""
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

        def flex_case(score_mod_factory, scale=None, kernel_options=None):
            def fn():
                score_mod = score_mod_factory()
                out = compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                               kernel_options=kernel_options)
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

        small = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1}
        cases["flex+alibi"] = flex_case(alibi_mod)
        cases["flex+t5"] = (flex_case(t5_mod, kernel_options=T5ScoreMod.kernel_options),
                            flex_case(t5_mod, kernel_options=small))
        cases["flex+tupe"] = (flex_case(tupe_mod, scale_tupe, TUPEScoreMod.kernel_options),
                              flex_case(tupe_mod, scale_tupe, small))

    for name, (bias_fn, scale) in biases.items():
        cases[f"explicit+{name}"] = library("explicit", bias_fn, scale)
    return cases, q, k, v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape, float32, few iterations (CPU)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="skip rows not started within this many seconds")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch._dynamo.config.cache_size_limit = 64  # one flex graph per scheme x mask layout x dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        b, h, n, d, dtype, warmup, iters = 2, 4, 128, 32, torch.float32, 2, args.iters or 5
        model_shape = dict(b=2, n=128, dim=64, heads=4, depth=1, amp_dtype=None)
    else:
        b, h, n, d, dtype, warmup, iters = 16, 12, 1024, 64, torch.bfloat16, 10, args.iters or 50
        model_shape = dict(b=16, n=1024, dim=768, heads=12, depth=1, amp_dtype=torch.bfloat16)
    flex = device.type == "cuda"  # FlexAttention has no backward on CPU; its rows are GPU-only
    cases, q, k, v = make_cases(b, h, n, d, dtype, device, flex)

    # which kernel the library's sdpa rows really hit is up to PyTorch; record the dispatch choice
    req = AttendRequest(q=q, k=k, v=v, causal=True, bias=torch.zeros(1, h, n, n, device=device, dtype=dtype))
    results = {}
    record = dict(benchmark="attention_bias", shape=dict(b=b, h=h, n=n, d=d, dtype=str(dtype), causal=True),
                  model_shape={k: str(v) if k == "amp_dtype" else v for k, v in model_shape.items()},
                  warmup=warmup, iters=iters, results=results, anchor_h200_ms={
                      "sdpa": 0.58, "sdpa+alibi": 1.52, "flex+alibi": 0.96, "sdpa+t5": 4.83, "sdpa+tupe": 3.98},
                  **environment())
    name_out = "attention_bias" + ("_quick" if args.quick else "")

    def err(e):
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

    def run_row(name, fn, extra=None):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            results[name] = dict(ms=None, error="skipped: time budget")
            return
        try:
            results[name] = dict(ms=timer(fn, device, warmup, iters), **(extra or {}))
        except Exception as e:  # noqa: BLE001 - a variant this torch cannot run is reported, not fatal
            results[name] = dict(ms=None, error=err(e), **(extra or {}))
        write_result(name_out, record)  # partial results survive a kill

    for name, fn in cases.items():
        if isinstance(fn, tuple):  # flex with kernel_options, then a smaller set if that fails
            run_row(name, fn[0], dict(kernel_options="scheme default"))
            if results[name]["ms"] is None and "budget" not in results[name]["error"]:
                first = results[name]["error"]
                run_row(name, fn[1], dict(kernel_options="BLOCK 32/32, 1 stage", first_error=first))
        else:
            run_row(name, fn)
    model_iters = max(3, iters // 5)
    for name, (fn, chosen) in model_cases(device=device, **model_shape).items():
        try:
            extra = dict(dispatch=chosen()) if name.endswith(":auto") else {}
        except Exception as e:  # noqa: BLE001
            extra = dict(dispatch=err(e))
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            results[name] = dict(ms=None, error="skipped: time budget", **extra)
            continue
        try:
            results[name] = dict(ms=timer(fn, device, 2, model_iters), **extra)
        except Exception as e:  # noqa: BLE001
            results[name] = dict(ms=None, error=err(e), **extra)
        write_result(name_out, record)

    def ratio(a, b_):
        ra, rb = results.get(a, {}).get("ms"), results.get(b_, {}).get("ms")
        return None if ra is None or rb is None else rb / ra

    print(f"attention fwd+bwd, b{b} h{h} n{n} d{d} causal {str(dtype).split('.')[-1]} on {device.type}")
    print(f"{'path':<16}{'ms':>10}{'explicit/this':>16}")
    for name, r in results.items():
        if name.startswith("model:"):
            continue
        scheme = name.split("+")[1] if "+" in name else None
        speedup = ratio(name, f"explicit+{scheme}") if scheme else None
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "n/a"
        print(f"{name:<16}{ms:>10}{(f'{speedup:.2f}x' if speedup else ''):>16}" + (f"  {r['error']}" if "error" in r else ""))
    summary = {f"flex_over_sdpa_{s}": ratio(f"sdpa+{s}", f"flex+{s}") for s in ("alibi", "t5", "tupe")}
    for key, val in summary.items():
        if val is not None:
            print(f"{key}: {val:.3f} (>1: sdpa float bias is faster)")

    ms = model_shape
    print(f"\nmodel: Decoder dim{ms['dim']} h{ms['heads']} n{ms['n']} b{ms['b']} depth{ms['depth']} fwd+bwd "
          f"({ms['amp_dtype']} autocast)")
    print(f"{'row':<24}{'ms':>10}{'sdpa/this':>12}  dispatch")
    for name, r in results.items():
        if not name.startswith("model:"):
            continue
        _, scheme, path = name.split(":")
        sd = results.get(f"model:{scheme}:sdpa", {}).get("ms")
        mst = f"{r['ms']:.3f}" if r["ms"] is not None else "n/a"
        sp = f"{sd / r['ms']:.2f}x" if r["ms"] and sd else ""
        print(f"{name:<24}{mst:>10}{sp:>12}  {r.get('dispatch', '')}" + (f"  {r['error']}" if "error" in r else ""))
    try:
        record["dispatch_with_dense_bias"] = choose_backend(req).name
    except Exception as e:  # noqa: BLE001
        record["dispatch_with_dense_bias"] = err(e)
    record.update(summary=summary, elapsed_s=round(time.perf_counter() - t0, 1))
    print(f"wrote {write_result(name_out, record)}")


if __name__ == "__main__":
    main()
