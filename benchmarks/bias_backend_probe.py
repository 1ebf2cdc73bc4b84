"""Where the compiled cost of ALiBi and T5 biases goes (issue 22, item 6), on the path users call:
``torch.compile(AutoregressiveWrapper(lm))(x)``, GPT-2-small shape, bf16, fused AdamW. For each bias
the step is timed with attention's backend chosen automatically and forced to each of ``flex`` and
``sdpa``, and the backend automatic dispatch picked is recorded (from the first eager forward).

    PYTHONPATH=src python benchmarks/bias_backend_probe.py [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess

import torch

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper
from x_transformers.attend import attend_backend

attend_module = importlib.import_module("x_transformers.attend")

B, T = 16, 1024
CASES = {"plain": {}, "alibi": dict(alibi_pos_bias=True), "t5": dict(rel_pos_bias=True)}


def picked_backend(lm, x) -> list[str]:
    seen = []
    original = attend_module.choose_backend

    def spy(req, *a, **k):
        backend = original(req, *a, **k)
        seen.append(backend.name)
        return backend
    attend_module.choose_backend = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            lm(x[:, :-1])
    finally:
        attend_module.choose_backend = original
    return sorted(set(seen))


def step_ms(label: str, kw: dict, force: str | None, compiled: bool = True) -> dict:
    torch.manual_seed(0)
    torch._dynamo.reset()
    lm = TransformerWrapper(num_tokens=50304, max_seq_len=T, attn_layers=Decoder(dim=768, depth=12, heads=12, **kw)).cuda()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, 50304, (B, T + 1), device="cuda")
    picked = picked_backend(lm, x) if force is None else [force]
    model = torch.compile(AutoregressiveWrapper(lm)) if compiled else AutoregressiveWrapper(lm)
    ctx = attend_backend(force) if force else contextlib.nullcontext()
    times = []
    with ctx:
        for i in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    ms = sorted(times[3:])[len(times[3:]) // 2]
    row = dict(case=label, mode="compiled" if compiled else "eager", backend=force or "auto", picked=picked, ms=round(ms, 2), tokens_per_s=round(B * T / ms * 1e3))
    print(row, flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--cases", default="alibi,t5", help="biases to probe, from " + ", ".join(CASES))
    p.add_argument("--modes", default="compiled", help="compiled and/or eager")
    a = p.parse_args()
    modes = [m == "compiled" for m in a.modes.split(",")]
    rows = [step_ms("plain", {}, None, compiled) for compiled in modes]
    for label in a.cases.split(","):
        for force, compiled in [(f, c) for c in modes for f in (None, "flex", "sdpa")]:
            try:
                rows.append(step_ms(label, CASES[label], force, compiled))
            except Exception as e:  # a forced backend that cannot run this request: say so
                rows.append(dict(case=label, mode="compiled" if compiled else "eager", backend=force, error=f"{type(e).__name__}: {str(e)[:300]}"))
                print(rows[-1], flush=True)
    plain = {r["mode"]: r["ms"] for r in rows if r["case"] == "plain"}
    for r in rows:
        if "ms" in r:
            r["cost_vs_plain"] = round(r["ms"] / plain[r["mode"]], 3)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    out = dict(benchmark="compiled AutoregressiveWrapper step, ALiBi / T5 bias by attention backend",
               shape=dict(vocab=50304, dim=768, depth=12, heads=12, batch=B, seq=T), card=torch.cuda.get_device_name(),
               torch=torch.__version__, commit=os.environ.get("XT_COMMIT", commit), rows=rows)
    path = a.json or os.path.join(os.environ.get("OUT", "benchmarks/results"), "bias_backend_probe.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
