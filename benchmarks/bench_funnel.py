"""Funnel Transformer (2006.03236) against a plain Encoder of the same total depth.

For each sequence length: FLOPs of one forward + backward (counted by
torch.utils.flop_counter.FlopCounterMode on the explicit attention path, so attention matmuls
are counted on every device) and the median wall time of one forward + backward (default
backend: SDPA). Models: the anchor Encoder(depth=sum(depths)), FunnelEncoder(depths), and
FunnelEncoder(depths, upsample=True) (2 extra full-length layers, for token-level outputs).

    PYTHONPATH=src python benchmarks/bench_funnel.py --quick          # CPU: dim 64, batch 1
    PYTHONPATH=src python benchmarks/bench_funnel.py                  # GPU: dim 768, batch 8, bf16

Prints a table; writes JSON to $OUT (when set) or benchmarks/results/, naming the device, the
torch version and the git commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from x_transformers import Encoder, FunnelEncoder
from x_transformers.attend import attend_backend


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def make_models(dim, heads, depths):
    torch.manual_seed(0)
    kw = dict(heads=heads, rotary_pos_emb=True)
    return {
        f"Encoder(depth={sum(depths)})": Encoder(dim, sum(depths), **kw),
        f"Funnel{tuple(depths)}": FunnelEncoder(dim, depths=depths, **kw),
        f"Funnel{tuple(depths)}+upsample": FunnelEncoder(dim, depths=depths, upsample=True, **kw),
    }


def step(model, x, autocast):
    with autocast():
        out = model(x)
    out.float().square().mean().backward()


def measure(model, x, autocast, iters, warmup, sync):
    with attend_backend("explicit"), FlopCounterMode(display=False) as counter:
        step(model, x, autocast)
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step(model, x, autocast)
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step(model, x, autocast)
        sync()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return flops, statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU setting: dim 64, heads 4, batch 1")
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 4, 4])
    p.add_argument("--dim", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--iters", type=int)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick or device == "cpu"
    dim = args.dim or (64 if quick else 768)
    heads = args.heads or (4 if quick else 12)
    batch = args.batch or (1 if quick else 8)
    iters = args.iters or (3 if quick else 10)
    warmup = 1 if quick else 3
    if device == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
        sync = torch.cuda.synchronize
    else:
        autocast, sync = contextlib.nullcontext, lambda: None

    models = make_models(dim, heads, args.depths)
    rows = []
    for n in args.seqs:
        x = torch.randn(batch, n, dim, device=device)
        anchor = None
        for name, model in models.items():
            model.to(device).train()
            flops, seconds = measure(model, x, autocast, iters, warmup, sync)
            anchor = anchor or (flops, seconds)
            rows.append(dict(seq=n, model=name, gflops=flops / 1e9, ms=seconds * 1e3,
                             flops_ratio=flops / anchor[0], time_ratio=seconds / anchor[1],
                             out_len=model.output_length(n) if isinstance(model, FunnelEncoder) else n))

    print(f"{'seq':>5}  {'model':<28} {'GFLOP f+b':>10} {'ms f+b':>9} {'FLOPs/anchor':>13} {'time/anchor':>12} {'out len':>8}")
    for r in rows:
        print(f"{r['seq']:>5}  {r['model']:<28} {r['gflops']:>10.2f} {r['ms']:>9.1f} {r['flops_ratio']:>13.3f} "
              f"{r['time_ratio']:>12.3f} {r['out_len']:>8}")

    meta = dict(bench="funnel", device=device_name(device), torch=torch.__version__, commit=git_commit(),
                dim=dim, heads=heads, batch=batch, depths=args.depths, iters=iters,
                dtype="bf16 autocast" if device == "cuda" else "fp32", anchor=f"Encoder(depth={sum(args.depths)})",
                flops_counted_on="explicit attention path (FlopCounterMode)", time_backend="auto (sdpa)")
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"funnel_{device}.json"
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
