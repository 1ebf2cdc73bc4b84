"""GPU agreement of issue 20's flex paths with the explicit (materialised scores) path, gradients included:
the attention sink as out * sigmoid(lse - sink) from flex's differentiable logsumexp, softcapping as a
score_mod and the sliding window as a block mask. Two levels:

- ``attend`` forced to flex (the compiled kernel) against the explicit backend, float32: outputs and the
  gradients of q, k, v and the sink logits, for causal / padded / windowed / grouped-query requests;
- a ``Decoder`` under ``torch.compile`` (automatic dispatch, so flex where it is chosen) against the
  same model on the explicit backend: output and every parameter's gradient.

Exit 1 on any disagreement or error. Output: $OUT/check_sinks_gpu.json (or benchmarks/results/).

    PYTHONPATH=src python benchmarks/gpu_check_sinks.py
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from x_transformers import Decoder  # noqa: E402
from x_transformers.attend import attend, attend_backend, choose_backend, AttendRequest  # noqa: E402
import x_transformers.flex  # noqa: E402,F401  (registers the backend)

TOL = dict(rtol=2e-3, atol=2e-4)


def rel_err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max().clamp(min=1e-12))


def attend_case(name, causal=True, padded=False, window=None, g=8, softclamp=None):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, n, d = 2, 8, 512, 64
    q = torch.randn(b, h, n, d, device="cuda", generator=gen, requires_grad=True)
    k, v = (torch.randn(b, g, n, d, device="cuda", generator=gen, requires_grad=True) for _ in range(2))
    sink = torch.randn(h, device="cuda", generator=gen).requires_grad_()
    opts = dict(causal=causal, sink=sink, max_attend_past=window, softclamp=softclamp, scale=d ** -0.5)
    if padded:
        mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
        mask[1, :37] = False
        opts["mask"] = mask[:, None, None]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if window is not None:
            opts["window_positions"] = (pos, pos)
    picked = choose_backend(AttendRequest(q=q, k=k, v=v, **opts)).name
    w = torch.randn(b, h, n, d, device="cuda", generator=gen)
    results = {}
    for backend in ("flex", "explicit"):
        out, _ = attend(q, k, v, force_backend=backend, **opts)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v, sink))
        results[backend] = (out, *grads)
    errs = {t: rel_err(a, bb) for t, a, bb in zip(("out", "dq", "dk", "dv", "dsink"), results["flex"], results["explicit"])}
    ok = all(torch.allclose(a, bb, **TOL) for a, bb in zip(results["flex"], results["explicit"]))
    return dict(case=name, level="attend", auto_picked=picked, ok=ok, rel_err=errs)


def model_case(name, **kw):
    torch.manual_seed(0)
    model = Decoder(dim=256, depth=2, heads=4, **kw).cuda()
    if kw.get("attn_head_learned_sink"):
        with torch.no_grad():
            for layer in model.modules():
                if type(layer).__name__ == "Attention" and layer.sink is not None:
                    layer.sink.normal_()
    x = torch.randn(2, 384, 256, device="cuda")
    w = torch.randn_like(x)
    compiled = torch.compile(model)
    out_c = compiled(x)
    (out_c * w).sum().backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with attend_backend("explicit"):
        out_e = model(x)
    (out_e * w).sum().backward()
    grads_e = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    errs = {"out": rel_err(out_c, out_e)}
    errs.update({n: rel_err(grads_c[n], grads_e[n]) for n in grads_e})
    # every gradient within 1e-3 of its largest entry (float32, different summation orders)
    ok = set(grads_c) == set(grads_e) and max(errs.values()) < 1e-3
    return dict(case=name, level="compiled Decoder vs explicit", ok=ok, rel_err=errs)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    checks = [
        lambda: attend_case("causal"),
        lambda: attend_case("causal_padded", padded=True),
        lambda: attend_case("causal_window_padded", padded=True, window=100),
        lambda: attend_case("bidirectional_gqa", causal=False, g=2),
        lambda: attend_case("causal_softcap", softclamp=5.0),
        lambda: model_case("sinks", attn_head_learned_sink=True),
        lambda: model_case("softcap", attn_softclamp_logits=True, attn_logit_softclamp_value=5.0),
        lambda: model_case("sliding_window", attn_max_attend_past=64),
    ]
    rows = []
    for check in checks:
        try:
            rows.append(check())
        except Exception as e:  # noqa: BLE001: record, go on, exit 1
            traceback.print_exc()
            rows.append(dict(case=getattr(check, "__name__", "?"), ok=False, error=f"{type(e).__name__}: {str(e)[:500]}"))
        print(rows[-1], flush=True)
    failed = [r["case"] for r in rows if not r["ok"]]
    path = write_result("check_sinks", dict(check="issue 20 flex paths vs explicit, gradients included",
                                            **environment(), failed=failed, rows=rows))
    print(f"wrote {path}; {'FAILED: ' + ', '.join(failed) if failed else 'all agree'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
