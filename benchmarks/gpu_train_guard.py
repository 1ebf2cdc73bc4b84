"""GPU guard: the training command with ``--compile`` follows the same loss curve as without.

Runs ``xtransformers train --preset 1b`` (about 0.9B parameters, bf16 autocast, fused AdamW, lr
3e-4 with no warm-up, the standard-library corpus) for ``--steps`` steps twice, eager and with
``--compile`` (forward and chunked loss as one graph), from the same seed and batches, and
compares the per-step training losses. Passes when every step's losses are within ``--tol``
(0.02). The compiled chunked loss once computed wrong gradients at this shape and training
diverged (9.9 -> 19.2 at step 2); eager and compiled then parted within three steps.

    PYTHONPATH=src python benchmarks/gpu_train_guard.py [--steps 50] [--tol 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, environment, write_result  # noqa: E402


def train(run: Path, steps: int, compile: bool, preset: str) -> list[float]:
    cmd = [sys.executable, "-m", "x_transformers", "train", "--preset", preset, "--max-steps", str(steps),
           "--warmup-steps", "0", "--log-every", "1", "--eval-batches", "2", "--sample-tokens", "16",
           "--no-progress", "--out", str(run)] + (["--compile"] if compile else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, check=True, env=env)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tol", type=float, default=0.02)
    ap.add_argument("--preset", default="1b")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="train_guard_"))
    try:
        curves = {name: train(scratch / name, args.steps, name == "compiled", args.preset)
                  for name in ("eager", "compiled")}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the checkpoints are ~11 GB each at 1b
    gaps = [abs(a - b) for a, b in zip(curves["eager"], curves["compiled"])]
    passed = len(gaps) == args.steps and max(gaps) <= args.tol
    payload = {"env": environment(), "preset": args.preset, "steps": args.steps, "tol": args.tol, "curves": curves,
               "max_abs_gap": max(gaps), "passed": passed}
    path = write_result(f"train_guard_{args.preset}", payload)
    print(f"eager    {curves['eager'][0]:.4f} -> {curves['eager'][-1]:.4f}")
    print(f"compiled {curves['compiled'][0]:.4f} -> {curves['compiled'][-1]:.4f}")
    print(f"max |gap| {max(gaps):.4f} (tol {args.tol}):", "passed" if passed else "FAILED", "->", path)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
