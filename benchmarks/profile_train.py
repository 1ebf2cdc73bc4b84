"""Where a training step's time goes: torch.profiler over a few steps of the gpt2 shape.

    PYTHONPATH=src python benchmarks/profile_train.py [--quick] [--shape gpt2] [--mode compiled] [--loss plain]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import COMPILE_MODES, build, make_step  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--mode", default="eager", choices=sorted(COMPILE_MODES))
    p.add_argument("--loss", default="fused", choices=["fused", "plain"])
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, loss_fn, *_ = build("ours", args.shape, args.quick, loss=args.loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    step = make_step(model, loss_fn, opt, args.mode, dev)

    for _ in range(3):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    print(table)
    out = os.environ.get("OUT")
    if out:
        Path(out, f"profile_{args.shape}_{args.mode}_{args.loss}.txt").write_text(table)


if __name__ == "__main__":
    main()
