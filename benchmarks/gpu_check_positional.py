"""Agreement of the fused attention paths with the explicit one for the bias-based positional schemes.

For ALiBi, T5, TUPE and TUPE-R (with the untied [CLS]), in an encoder and a decoder, with key
padding: the layer stack's output, the gradient of its input and the gradient of the scheme's
learned table. Fused paths: what dispatch picks ("auto": flex for ALiBi on CUDA, SDPA with a
float bias otherwise), and each fused backend forced (sdpa, flex).

Criterion (relative Frobenius error, ||a - b|| / ||b||, against a float32 explicit reference):
  float32: fused within 1e-4 of the reference (outputs and gradients).
  bf16 (autocast): fused output within 1e-2 of the reference; fused gradients no worse than 1.5x
  the explicit bf16 path's own error against the same reference (both printed). Two bf16
  computations differ by bf16 rounding however exact both are, so comparing them to each other,
  or by a max-normalised max error, measures bf16, not the kernel; the old max-based number
  (max|fused - explicit_same_dtype| / max|explicit_same_dtype|) is still recorded as ``old_max_*``.

A row that raises (e.g. flex failing to compile) is recorded with its error, not fatal; a forced
backend's error does not fail the check, the dispatcher's choice ("auto") failing does.

  PYTHONPATH=src python benchmarks/gpu_check_positional.py           # dim 768, seq 1024 (GPU)
  PYTHONPATH=src python benchmarks/gpu_check_positional.py --quick   # small, CPU is fine

JSON goes to $OUT when set, else benchmarks/results/ (rewritten after every row). Exit 1 on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from common import environment, write_result
from x_transformers import Decoder, Encoder
from x_transformers.attend import BACKENDS, AttendRequest, attend_backend, choose_backend

SCHEMES = {
    "alibi": dict(alibi_pos_bias=True),
    "t5": dict(rel_pos_bias=True),
    "tupe": dict(tupe=True),
    "tupe_r_cls": dict(tupe=True, rel_pos_bias=True, tupe_untie_cls=True),
}
FP32_TOL, BF16_OUT_TOL, BF16_GRAD_RATIO = 1e-4, 1e-2, 1.5


def fro(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def max_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def learned_table(layers):
    if layers.tupe is not None:
        return layers.tupe.emb.weight
    if layers.rel_pos is not None and hasattr(layers.rel_pos, "relative_attention_bias"):
        return layers.rel_pos.relative_attention_bias.weight
    return None


def run_once(layers, x, mask, backend, dtype, device):
    """(output, grad of x, grad of the learned table or None) with backend forced (None: auto)."""
    layers.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    with attend_backend(backend), amp:
        out = layers(x, mask)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
    table = learned_table(layers)
    keep = mask[..., None]
    res = dict(out=(out.detach().float() * keep), grad_x=x.grad.float())
    if table is not None:
        res["grad_table"] = table.grad.detach().float().clone()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (runs on CPU)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip rows not started within this many seconds")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference must be float32
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64  # one flex graph per scheme x mask layout x dtype
    b, n, dim, heads, depth = (2, 16, 32, 4, 2) if args.quick else (4, 1024, 768, 12, 2)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, dim, generator=g).to(device)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask[0, -n // 4:] = False  # right padding in one row, left in another
    mask[-1, : n // 8] = False

    rows, skipped, ok = [], [], True
    record = dict(check="positional_fused_vs_explicit", shape=dict(b=b, n=n, dim=dim, heads=heads, depth=depth),
                  metric="||a - b||_F / ||b||_F against the float32 explicit reference",
                  criterion=dict(float32=FP32_TOL, bf16_out=BF16_OUT_TOL, bf16_grad_ratio_to_explicit_bf16=BF16_GRAD_RATIO),
                  rows=rows, skipped=skipped, **environment())

    def save():
        record.update(passed=ok, elapsed_s=round(time.perf_counter() - t0, 1))
        return write_result("check_positional" + ("_quick" if args.quick else ""), record)

    # Phase 1: what dispatch picks and forced sdpa, every scheme; phase 2: forced flex where dispatch
    # did not already pick it (each is a compile: run last, within the budget).
    plan = [(s, c, be) for be in ("auto", "sdpa") for s in SCHEMES for c in (Encoder, Decoder)]
    plan += [(s, c, "flex") for s in SCHEMES for c in (Encoder, Decoder)]
    built, refs = {}, {}
    for scheme, cls, backend in plan:
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{scheme}/{cls.__name__}/{backend}: time budget")
            continue
        key = (scheme, cls.__name__)
        try:
            if key not in built:
                kw = SCHEMES[scheme]
                if "tupe" in kw:
                    kw = dict(kw, tupe_max_seq_len=n)
                torch.manual_seed(0)
                layers = cls(dim=dim, depth=depth, heads=heads, **kw).to(device)
                with torch.no_grad():  # sharper attention than the N(0, 0.02) init, so the bias matters
                    for name, p in layers.named_parameters():
                        if name.endswith(("to_q.weight", "to_k.weight")):
                            p.mul_(10)
                built[key] = layers
                refs[key] = dict(float32=run_once(layers, x, mask, "explicit", "float32", device),
                                 bfloat16=run_once(layers, x, mask, "explicit", "bfloat16", device))
            layers, ref32, exp16 = built[key], refs[key]["float32"], refs[key]["bfloat16"]
        except Exception as e:  # noqa: BLE001
            rows.append(dict(scheme=scheme, kind=cls.__name__, backend="explicit", passed=False,
                             error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
            ok = False
            save()
            continue
        d = dim // heads
        pos = torch.arange(n, device=device)[None]
        sm = layers.rel_pos.score_mod(pos, pos) if layers.rel_pos is not None else None
        sm = layers.tupe.score_mod(pos, pos, sm) if layers.tupe is not None else sm
        probe = AttendRequest(q=x.new_zeros(b, heads, n, d), k=x.new_zeros(b, heads, n, d), v=x.new_zeros(b, heads, n, d),
                              mask=mask[:, None, None], causal=cls is Decoder, score_mod=sm)
        chosen = choose_backend(probe).name if backend == "auto" else backend
        if backend == "flex" and "flex" in BACKENDS and choose_backend(probe).name == "flex":
            continue  # auto already was flex
        for dtype in ("float32", "bfloat16"):
            row = dict(scheme=scheme, kind=cls.__name__, dtype=dtype, backend=backend, ran_on=chosen)
            try:
                got = run_once(layers, x, mask, None if backend == "auto" else backend, dtype, device)
                for t, ref in ref32.items():
                    row[t] = fro(got[t], ref)
                    row[f"old_max_{t}"] = max_err(got[t], (ref if dtype == "float32" else exp16[t]))
                if dtype == "float32":
                    row["passed"] = all(row[t] <= FP32_TOL for t in ref32)
                else:
                    for t in ref32:
                        if t != "out":
                            row[f"explicit_bf16_{t}"] = fro(exp16[t], ref32[t])
                    row["explicit_bf16_out"] = fro(exp16["out"], ref32["out"])
                    row["passed"] = row["out"] <= BF16_OUT_TOL and all(
                        row[t] <= BF16_GRAD_RATIO * row[f"explicit_bf16_{t}"] for t in ref32 if t != "out")
                ok &= row["passed"]
            except Exception as e:  # noqa: BLE001 - reported per row; forced backends may not compile
                row.update(passed=None if backend != "auto" else False,
                           error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                if backend == "auto":
                    ok = False
            rows.append(row)
            save()

    print(f"fused vs explicit (float32 reference), b{b} n{n} dim{dim} h{heads} depth{depth} on {device.type}")
    print("rel. Frobenius error; bf16 gradients: fused / explicit-bf16, both against the float32 reference")
    print(f"{'scheme':<11}{'kind':<8}{'dtype':<9}{'path':<10}{'out':>9}{'grad_x':>19}{'grad_table':>19}"
          f"{'old max out':>12}  ok")
    for r in rows:
        if "error" in r:
            print(f"{r['scheme']:<11}{r['kind']:<8}{r.get('dtype', '-'):<9}{r['backend']:<10}  ERROR {r['error']}")
            continue

        def cell(t):
            if t not in r:
                return "-"
            return f"{r[t]:.2e}" + (f"/{r['explicit_bf16_' + t]:.2e}" if r["dtype"] == "bfloat16" else "")
        path = r["backend"] if r["backend"] != "auto" else f"auto:{r['ran_on']}"
        print(f"{r['scheme']:<11}{r['kind']:<8}{r['dtype']:<9}{path:<10}{r['out']:>9.2e}{cell('grad_x'):>19}"
              f"{cell('grad_table'):>19}{r['old_max_out']:>12.2e}  {'yes' if r['passed'] else 'NO'}")
    for s in skipped:
        print(f"skipped {s}")
    path = save()
    print(f"{'all passed' if ok else 'SOME CHECKS FAILED'}; wrote {path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
