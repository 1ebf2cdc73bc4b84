"""Scaling from 1 to N processes: training tokens/s of the gpt2-small preset, one process (the anchor,
measured in the same run) against N-process DDP and FSDP2 at the same per-process batch.

    PYTHONPATH=src python benchmarks/bench_scaling.py                # GPUs: 1 vs 2, DDP and FSDP
    PYTHONPATH=src python benchmarks/bench_scaling.py --quick        # CPU smoke test (gloo, tiny model)

Each configuration runs in its own ``torchrun`` and drives the library's own training step
(``x_transformers.training.loop.Trainer.train_step``: bf16, AdamW, clipping) on the embedded corpus.
Prints a table; writes JSON to $OUT (when set) or benchmarks/results/, naming the card, torch version
and git commit. Scaling efficiency = tokens/s with N processes / (N x tokens/s with one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch

    from x_transformers.training.config import load_config
    from x_transformers.training.loop import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    sets = {"strategy": args.strategy, "batch_size": args.batch * world, "max_steps": 10_000, "progress": False,
            "stdlib_bytes": 2_000_000, "compile": args.compile}
    if args.quick:
        sets.update({"model.dim": 64, "model.depth": 2, "model.heads": 4, "model.num_tokens": 256, "seq_len": 64})
    cfg = load_config(args.preset, sets=sets)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", log=lambda *a, **k: None)
        cuda = trainer.env.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(args.warmup):
            trainer.train_step()
        sync()
        trainer.env.barrier()
        t0, tokens = time.perf_counter(), 0
        for _ in range(args.steps):
            tokens += trainer.train_step()["tokens"]
        sync()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if trainer.env.main:
            print("RESULT " + json.dumps({"strategy": args.strategy, "processes": world, "tokens_per_s": tokens / dt,
                                          "step_ms": 1000 * dt / args.steps, "peak_gib_rank0": peak,
                                          "global_batch": cfg.batch_size, "seq_len": cfg.seq_len}), flush=True)
        trainer.close()


def launch(nproc: int, strategy: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           "--worker", "--strategy", strategy, "--preset", args.preset, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else []) + \
          (["--compile"] if args.compile else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{nproc} x {strategy} failed:\n{proc.stderr[-4000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=16, help="sequences per process per step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: a tiny model, 3 steps")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.batch, args.steps, args.warmup = 2, 3, 1

    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    runs = [launch(1, "ddp", args)]  # the anchor: one process, same code path
    print(json.dumps(runs[-1]), flush=True)
    for strategy in ("ddp", "fsdp"):
        runs.append(launch(args.nproc, strategy, args))
        print(json.dumps(runs[-1]), flush=True)
    base = runs[0]["tokens_per_s"]
    for r in runs:
        r["efficiency"] = r["tokens_per_s"] / (r["processes"] * base)
        r["ratio_to_one_process"] = r["tokens_per_s"] / base

    print(f"\nscaling, preset {args.preset}, {args.batch} sequences per process, card {card}")
    print(f"{'processes':>9} {'strategy':>8} {'tokens/s':>12} {'step ms':>9} {'efficiency':>10} {'peak GiB':>9}")
    for r in runs:
        peak = f"{r['peak_gib_rank0']:.1f}" if r["peak_gib_rank0"] is not None else "-"
        print(f"{r['processes']:>9} {r['strategy']:>8} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>9.1f} "
              f"{r['efficiency']:>10.1%} {peak:>9}")

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scaling-{'quick-' if args.quick else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"benchmark": "bench_scaling", "card": card, "gpus": torch.cuda.device_count(),
                                "torch": torch.__version__, "commit": commit or None, "preset": args.preset,
                                "compile": args.compile, "runs": runs}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
