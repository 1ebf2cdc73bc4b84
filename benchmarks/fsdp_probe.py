"""Where an FSDP2 training step's time goes, on one GPU (issue 22, item 7): the library's own step
(``Trainer.train_step``: bf16, AdamW, clipping) with ``--strategy ddp`` and ``--strategy fsdp`` in a
process group of one, so no time is communication. Each phase (forward + loss, backward, clipping,
optimizer) is timed with the device synchronised around it, then one step is profiled.

    PYTHONPATH=src python benchmarks/fsdp_probe.py [--preset gpt2-small] [--strategies ddp,fsdp]
    PYTHONPATH=src python benchmarks/fsdp_probe.py --quick          # CPU (gloo), a tiny model

Writes JSON ($OUT/fsdp_probe.json, else benchmarks/results/) with the card, versions and commit.
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


def child(args) -> dict:
    import torch

    from x_transformers.training.config import load_config
    from x_transformers.training.loop import Trainer

    sets = {"strategy": args.strategy, "batch_size": args.batch, "max_steps": 10_000, "progress": False,
            "stdlib_bytes": 2_000_000}
    if args.quick:
        sets.update({"model.dim": 64, "model.depth": 2, "model.heads": 4, "seq_len": 64,
                     "device": "cpu"})
    cfg = load_config(args.preset, sets=sets)
    cuda = torch.cuda.is_available() and not args.quick
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    phases = {"forward_loss": [], "backward": [], "clip": [], "optimizer": [], "step": []}
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run", log=lambda *a, **k: None)
        for _ in range(args.warmup):
            tr.train_step()
        for _ in range(args.steps):  # the shipped step, whole
            sync()
            t = time.perf_counter()
            tr.train_step()
            sync()
            phases["step"].append(time.perf_counter() - t)
        for _ in range(args.steps):  # the same work, phase by phase
            batch = tr.data.batch(tr.step, "train", cfg.batch_size, tr.env.rows(cfg.batch_size))
            inputs = [x.to(tr.env.device) for x in batch.inputs]
            target = batch.target.to(tr.env.device)
            marks = []
            sync(); marks.append(time.perf_counter())
            loss = tr.forward_loss(inputs, target)
            sync(); marks.append(time.perf_counter())
            loss.backward()
            sync(); marks.append(time.perf_counter())
            norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.grad_clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            sync(); marks.append(time.perf_counter())
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
            sync(); marks.append(time.perf_counter())
            for name, a, b in zip(("forward_loss", "backward", "clip", "optimizer"), marks, marks[1:]):
                phases[name].append(b - a)
        table = None
        if args.profile:
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            with torch.profiler.profile(activities=acts) as prof:
                tr.train_step()
                sync()
            ka = prof.key_averages()
            table = {"by_cpu": ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)}
            if cuda:
                table["by_cuda"] = ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
        tr.close()
    med = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in phases.items()}
    return {"strategy": args.strategy, "ms": med, "tokens_per_step": cfg.batch_size * cfg.seq_len,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "profile": table}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--strategies", default="ddp,fsdp")
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="profile one step per strategy")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.strategy:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if args.quick:
        args.batch, args.steps, args.warmup = 2, 2, 1
    rows = []
    for strategy in args.strategies.split(","):
        cmd = [sys.executable, __file__, "--strategy", strategy, "--preset", args.preset, "--batch", str(args.batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
              (["--quick"] if args.quick else []) + (["--profile"] if args.profile else [])
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        got = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not got:
            raise SystemExit(f"{strategy} failed:\n{proc.stderr[-4000:]}")
        rows.append(got[0])
        print(strategy, json.dumps(got[0]["ms"]), flush=True)
        for t in (got[0]["profile"] or {}).values():
            print(t)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import environment, write_result

    path = write_result("fsdp_probe", {"env": environment(), "preset": args.preset, "processes": 1,
                                       "batch": args.batch, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
