"""FP8 against bf16 training on the path users call (issue 22, item 3): ``torch.compile(
AutoregressiveWrapper(lm))(x)`` under bf16 autocast with fused AdamW, one fresh process per variant:

- ``bf16``: the model as built;
- ``fp8-tensorwise`` / ``fp8-rowwise``: ``x_transformers.fp8.convert(lm, recipe=...)`` first.

    PYTHONPATH=src python benchmarks/bench_fp8.py [--shape 1b|gpt2] [--variants bf16,fp8-tensorwise] [--steps 10]

Writes JSON ($OUT/fp8_<shape>.json, else benchmarks/results/) with tokens/s per variant, the ratio to
bf16, the card, versions and commit. Needs a GPU of capability >= 8.9 and torchao for the fp8 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPES = {  # the training presets' shapes (x_transformers.training.presets)
    "1b": dict(num_tokens=50304, dim=2048, depth=16, heads=16, attn_dim_head=128, seq=2048, batch=8),
    "gpt2": dict(num_tokens=50304, dim=768, depth=12, heads=12, attn_dim_head=64, seq=1024, batch=16),
}


LAYERS = {  # which linears a variant converts (--layers): all that fp8.default_filter passes, or one kind
    "all": None,
    "ff": ("proj_in", "proj_out"),
    "attn": ("to_q", "to_k", "to_v", "to_out"),
}


def child(shape: str, variant: str, steps: int, overrides: dict | None = None, layers: str = "all") -> dict:
    import torch

    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper, fp8

    names = LAYERS[layers]
    chosen = None if names is None else (
        lambda module, fqn: fp8.default_filter(module, fqn) and fqn.rsplit(".", 1)[-1] in names)
    s = {**SHAPES[shape], **(overrides or {})}
    torch.manual_seed(0)
    lm = TransformerWrapper(num_tokens=s["num_tokens"], max_seq_len=s["seq"], tie_embedding=True, logits_scale=1.0,
                            attn_layers=Decoder(dim=s["dim"], depth=s["depth"], heads=s["heads"],
                                                attn_dim_head=s["attn_dim_head"])).cuda()
    if variant.startswith("fp8-"):
        fp8.convert(lm, recipe=variant[4:], module_filter=chosen)
    model = torch.compile(AutoregressiveWrapper(lm))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, s["num_tokens"], (s["batch"], s["seq"] + 1), device="cuda")
    losses, times = [], []
    t_compile = time.perf_counter()
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
        if i == 0:
            t_compile = time.perf_counter() - t_compile
    step = sorted(times[3:])[len(times[3:]) // 2]
    # MFU as bench_train counts it (6N + 12 L d T a token, N without embeddings; then with the head's
    # 6 v d), over the bf16 matrix-product peak measured here (FP8 rows too: the bf16 yardstick)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import matmul_peak_tflops

    inner = s["heads"] * s["attn_dim_head"]
    n_params = s["depth"] * (4 * s["dim"] * inner + 8 * s["dim"] ** 2)  # q, k, v, o; the feed-forward (x4)
    per_token = 6 * n_params + 12 * s["depth"] * s["dim"] * s["seq"]
    mem = torch.cuda.max_memory_allocated() / 2**30  # before the peak's own product
    peak, tps = matmul_peak_tflops(), s["batch"] * s["seq"] / step
    return dict(shape=shape, dims=s, layers=layers, variant=variant, step_s=round(step, 5), tokens_per_s=round(tps, 1),
                peak_tflops=round(peak, 1), mfu=round(tps * per_token / (peak * 1e12), 4),
                mfu_with_head=round(tps * (per_token + 6 * s["num_tokens"] * s["dim"]) / (peak * 1e12), 4),
                first_step_s=round(t_compile, 1), losses=[round(v, 4) for v in losses],
                converted_layers=len(fp8.converted(lm)), peak_mem_gib=round(mem, 2),
                card=torch.cuda.get_device_name(), torch=torch.__version__,
                torchao=__import__("importlib.metadata").metadata.version("torchao") if variant != "bf16" else None)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--variants", default="bf16,fp8-tensorwise,fp8-rowwise")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", default="all", choices=sorted(LAYERS), help="which linears the fp8 rows convert")
    for key in ("dim", "depth", "heads", "seq", "batch"):
        p.add_argument(f"--{key}", type=int, default=None, help=f"override the shape's {key}")
    p.add_argument("--tag", default=None, help="result file name stem (default fp8_<shape>)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = {k: getattr(args, k) for k in ("dim", "depth", "heads", "seq", "batch") if getattr(args, k) is not None}
    if args.child:
        print("RESULT " + json.dumps(child(args.shape, args.child, args.steps, overrides, args.layers)), flush=True)
        return
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--shape", args.shape, "--steps", str(args.steps),
               "--layers", args.layers, "--child", variant] + [a for k, v in overrides.items() for a in (f"--{k}", str(v))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = next((json.loads(line[7:]) for line in res.stdout.splitlines() if line.startswith("RESULT ")), None)
        rows.append(got or dict(variant=variant, error=(res.stderr or res.stdout)[-1500:]))
        print(json.dumps(rows[-1])[:400], flush=True)
    base = next((r["tokens_per_s"] for r in rows if r.get("variant") == "bf16" and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r:
            r["vs_bf16"] = round(r["tokens_per_s"] / base, 3)
    commit = os.environ.get("XT_COMMIT")  # a copied tree's git HEAD can be stale on the device machine
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:  # noqa: BLE001
            commit = None
    out = dict(benchmark="fp8 vs bf16, compiled AutoregressiveWrapper, fused AdamW", shape={**SHAPES[args.shape], **overrides}, layers=args.layers,
               commit=commit, python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
               rows=rows)
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    path = os.path.join(folder, f"{args.tag or 'fp8_' + args.shape}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
