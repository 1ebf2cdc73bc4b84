"""GPU check: the causal + float-bias path of the SDPA backend (ATen's memory-efficient kernel with
its causal flag, attend._efficient_causal_with_bias) computes what the explicit backend computes.

For T5 and TUPE decoders (and T5 with grouped key/value heads and with a ragged length), in
float32 and in bf16 autocast: the output and every parameter's gradient (the bias tables
included) of the sdpa backend against the explicit one, as ||a - b|| / ||b||, and which kernel ran.

    PYTHONPATH=src python benchmarks/gpu_check_causal_bias.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from x_transformers import Decoder, TransformerWrapper  # noqa: E402
from x_transformers.attend import attend_backend  # noqa: E402

attend_mod = sys.modules["x_transformers.attend"]

CASES = {
    "t5": dict(rel_pos_bias=True),
    "t5_gqa": dict(rel_pos_bias=True, attn_kv_heads=2),
    "tupe": dict(tupe=True, tupe_max_seq_len=512, use_abs_pos_emb=False),
}
LIMITS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def run(model, x, backend, amp):
    model.zero_grad(set_to_none=True)
    with attend_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    calls = {"efficient_causal_bias": 0}
    original = attend_mod._efficient_causal_with_bias

    def counting(req):
        calls["efficient_causal_bias"] += 1
        return original(req)
    attend_mod._efficient_causal_with_bias = counting

    results, ok = {}, True
    for name, kw in CASES.items():
        wrapper_kw = {"use_abs_pos_emb": kw.pop("use_abs_pos_emb")} if "use_abs_pos_emb" in kw else {}
        for n in (256, 300):
            for amp in (False, True):
                torch.manual_seed(0)
                model = TransformerWrapper(num_tokens=256, max_seq_len=512, **wrapper_kw,
                                           attn_layers=Decoder(dim=256, depth=2, heads=8, **kw)).cuda()
                x = torch.randint(0, 256, (4, n), device="cuda")
                before = calls["efficient_causal_bias"]
                out_s, g_s = run(model, x, "sdpa", amp)
                used = calls["efficient_causal_bias"] - before
                out_e, g_e = run(model, x, "explicit", amp)
                err = {"out": rel(out_s, out_e)}
                err.update({k: rel(g_s[k], g_e[k]) for k in g_e})
                worst = max(err.values())
                limit = LIMITS[torch.bfloat16 if amp else torch.float32]
                passed = worst < limit and used > 0 and set(g_s) == set(g_e)
                ok &= passed
                key = f"{name} n={n} {'bf16' if amp else 'fp32'}"
                results[key] = {"worst_rel_err": worst, "limit": limit, "efficient_calls": used, "passed": passed,
                                "bias_param_errs": {k: v for k, v in err.items() if "bias" in k or "tupe" in k}}
                print(key, json.dumps(results[key]), flush=True)
    path = write_result("check_causal_bias", {"env": environment(), "results": results, "all_passed": ok})
    print("all passed" if ok else "FAILED", "->", path)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
