"""The training command against the step it runs (issue 22, item 5): ``xtransformers train --preset
gpt2-small --compile`` (tokens/s of its last logged interval: steps, data, the loop's bookkeeping, with
losses read back only on logged steps), beside the same model's step timed bare in the same run:

- ``trainer_step``: ``Trainer.train_step(sync=False)`` in a loop (clipping, scheduler, data), one sync at the end;
- ``bare_step``: the compiled forward + loss, backward and fused AdamW on one batch held on the device.

    PYTHONPATH=src python benchmarks/bench_command.py [--steps 80] [--quick]

Writes JSON ($OUT/bench_command.json, else benchmarks/results/) with the card, versions and commit.
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


def settings(args) -> list[str]:
    """The command's flags, read by the command itself and, through its own parser, by the step child."""
    out = ["--preset", args.preset, "--stdlib-bytes", "2000000", "--sample-tokens", "0", "--no-progress"]
    if args.quick:
        out += ["--set", "model.dim=64", "--set", "model.depth=2", "--set", "model.heads=4", "--seq-len", "64",
                "--batch-size", "2", "--device", "cpu"]
    return out + ([] if args.quick else ["--compile"])


def command(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        half = args.steps // 2
        cmd = [sys.executable, "-m", "x_transformers", "train", *settings(args), "--max-steps", str(args.steps),
               "--log-every", str(half), "--eval-every", str(10 * args.steps), "--save-every", str(10 * args.steps),
               "--out", str(run)]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode:
            raise SystemExit(f"the command failed:\n{proc.stderr[-3000:]}")
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in recs if r.get("kind") == "train"]
        return {"tokens_per_s": train[-1]["tokens_per_s"], "interval_steps": half, "logged": len(train)}


def steps(args) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import sync, timed

    from x_transformers.cli import build_parser, config_overrides
    from x_transformers.training.config import load_config
    from x_transformers.training.loop import Trainer

    flags = build_parser().parse_args(["train", *settings(args)])
    cfg = load_config(flags.preset, flags.config, config_overrides(flags))
    half = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, Path(tmp) / "run", log=lambda *a, **k: None)
        for _ in range(half):  # compile, the compiled-vs-eager checks, warm-up
            tr.train_step()
        sync()
        t = time.perf_counter()
        tokens = sum(tr.train_step(sync=False)["tokens"] for _ in range(half))
        sync()
        trainer = tokens / (time.perf_counter() - t)
        batch = tr.data.batch(0, "train", cfg.batch_size, tr.env.rows(cfg.batch_size))
        inputs, target = [x.to(tr.env.device) for x in batch.inputs], batch.target.to(tr.env.device)

        def bare():
            tr.forward_loss(inputs, target).backward()
            tr.opt.step()
            tr.opt.zero_grad(set_to_none=True)
        bare_tps = batch.tokens / timed(bare, warmup=3, steps=half)
        tr.close()
    return {"trainer_step_tokens_per_s": trainer, "bare_step_tokens_per_s": bare_tps}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--timeout", type=int, default=600)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.steps = min(args.steps, 40)
    if args.child:
        print("RESULT " + json.dumps(steps(args)), flush=True)
        return
    row = command(args)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--steps", str(args.steps)] +
                          (["--quick"] if args.quick else []), env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    got = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not got:
        raise SystemExit(f"the step child failed:\n{proc.stderr[-3000:]}")
    row.update(got[0])
    row["command_vs_trainer_step"] = row["tokens_per_s"] / row["trainer_step_tokens_per_s"]
    row["command_vs_bare_step"] = row["tokens_per_s"] / row["bare_step_tokens_per_s"]
    print(json.dumps(row, indent=1))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import environment, write_result

    print("wrote", write_result("bench_command", {"env": environment(), "preset": args.preset, "row": row}))


if __name__ == "__main__":
    main()
