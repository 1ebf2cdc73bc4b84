"""Agreement of the fused attention path with the explicit one for the bias-based positional schemes.

For ALiBi, T5, TUPE and TUPE-R (with the untied [CLS]), in an encoder and a decoder, with key
padding: the layer stack's output, the gradient of its input and the gradient of the scheme's
learned table, on the fused path (SDPA with a float bias; what dispatch picks) against the
explicit path. Passes when the max-normalised error, max|fused - explicit| / max|explicit|, is
within 1e-2 in bf16 (autocast) and 1e-4 in float32. A script, not a pytest test: it needs a GPU
for the numbers that matter.

  PYTHONPATH=src python benchmarks/gpu_check_positional.py           # dim 768, seq 1024 (GPU)
  PYTHONPATH=src python benchmarks/gpu_check_positional.py --quick   # small, CPU is fine

JSON goes to $OUT when set, else benchmarks/results/. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from common import environment, write_result
from x_transformers import Decoder, Encoder
from x_transformers.attend import AttendRequest, attend_backend, choose_backend

SCHEMES = {
    "alibi": dict(alibi_pos_bias=True),
    "t5": dict(rel_pos_bias=True),
    "tupe": dict(tupe=True),
    "tupe_r_cls": dict(tupe=True, rel_pos_bias=True, tupe_untie_cls=True),
}
TOL = {"float32": 1e-4, "bfloat16": 1e-2}


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def learned_table(layers):
    if layers.tupe is not None:
        return layers.tupe.emb.weight
    if layers.rel_pos is not None and hasattr(layers.rel_pos, "relative_attention_bias"):
        return layers.rel_pos.relative_attention_bias.weight
    return None


def run_once(layers, x, mask, backend, dtype, device):
    layers.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    with attend_backend(backend), amp:
        out = layers(x, mask)
    (out.float() * torch.linspace(-1, 1, out.shape[-1], device=device)).sum().backward()
    table = learned_table(layers)
    return out.detach(), x.grad, None if table is None else table.grad.detach().clone()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (runs on CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b, n, dim, heads, depth = (2, 16, 32, 4, 2) if args.quick else (4, 1024, 768, 12, 2)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, dim, generator=g).to(device)
    mask = torch.ones(b, n, dtype=torch.bool, device=device)
    mask[0, -n // 4:] = False  # right padding in one row, left in another
    mask[-1, : n // 8] = False

    rows, ok = [], True
    for scheme, kw in SCHEMES.items():
        if "tupe" in kw:
            kw = dict(kw, tupe_max_seq_len=n)
        for cls in (Encoder, Decoder):
            torch.manual_seed(0)
            layers = cls(dim=dim, depth=depth, heads=heads, **kw).to(device)
            with torch.no_grad():  # sharper attention than the N(0, 0.02) init, so the bias matters
                for name, p in layers.named_parameters():
                    if name.endswith(("to_q.weight", "to_k.weight")):
                        p.mul_(10)
            d = dim // heads
            req = AttendRequest(q=x.new_zeros(b, heads, n, d), k=x.new_zeros(b, heads, n, d),
                                v=x.new_zeros(b, heads, n, d), mask=mask[:, None, None], causal=cls is Decoder,
                                bias=x.new_zeros(1, heads, n, n))
            fused = choose_backend(req).name
            for dtype in ("float32", "bfloat16"):
                ref = run_once(layers, x, mask, "explicit", dtype, device)
                got = run_once(layers, x, mask, fused, dtype, device)
                keep = mask[..., None]
                errs = dict(out=rel_err(got[0] * keep, ref[0] * keep), grad_x=rel_err(got[1], ref[1]))
                if ref[2] is not None:
                    errs["grad_table"] = rel_err(got[2], ref[2])
                passed = all(e <= TOL[dtype] for e in errs.values())
                ok &= passed
                rows.append(dict(scheme=scheme, kind=cls.__name__, dtype=dtype, fused_backend=fused,
                                 tol=TOL[dtype], passed=passed, **errs))

    print(f"fused vs explicit attention, b{b} n{n} dim{dim} h{heads} depth{depth} on {device.type}")
    print(f"{'scheme':<12}{'kind':<9}{'dtype':<10}{'fused':<8}{'out':>10}{'grad_x':>10}{'grad_tab':>10}  ok")
    for r in rows:
        gt = f"{r['grad_table']:.2e}" if "grad_table" in r else "-"
        print(f"{r['scheme']:<12}{r['kind']:<9}{r['dtype']:<10}{r['fused_backend']:<8}{r['out']:>10.2e}"
              f"{r['grad_x']:>10.2e}{gt:>10}  {'yes' if r['passed'] else 'NO'}")
    record = dict(check="positional_fused_vs_explicit", shape=dict(b=b, n=n, dim=dim, heads=heads, depth=depth),
                  metric="max|fused - explicit| / max|explicit|", tolerances=TOL, passed=ok, rows=rows,
                  **environment())
    path = write_result("check_positional" + ("_quick" if args.quick else ""), record)
    print(f"{'all passed' if ok else 'SOME CHECKS FAILED'}; wrote {path}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
