"""FP8 training's loss against bf16 over 1,000 steps (issue 22, item 3: "loss within 1% of bf16 over
1,000 steps on the stdlib corpus"), through the command users run:

    xtransformers train --preset 1b --compile --max-steps 1000 [--fp8 --fp8-recipe R]

Each variant is one invocation (a GPU call of a few minutes), the report a third:

    PYTHONPATH=src python benchmarks/fp8_loss_check.py run bf16 --out /tmp/fp8loss
    PYTHONPATH=src python benchmarks/fp8_loss_check.py run fp8-tensorwise --out /tmp/fp8loss
    PYTHONPATH=src python benchmarks/fp8_loss_check.py report --out /tmp/fp8loss [--json RESULT.json]

The report compares each FP8 run with the bf16 one: the validation loss at every evaluation, the
mean training loss over the last 100 steps, and tokens/s (median of the logged steps after the
first evaluation), with the card, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {"bf16": [], "fp8-tensorwise": ["--fp8", "--fp8-recipe", "tensorwise"],
            "fp8-rowwise": ["--fp8", "--fp8-recipe", "rowwise"]}


def train_args(steps: int) -> list[str]:
    return ["--preset", "1b", "--compile", "--precision", "bf16", "--max-steps", str(steps),
            "--eval-every", str(max(steps // 4, 1)), "--eval-batches", "16", "--log-every", "10",
            "--save-every", str(10 * steps), "--keep-checkpoints", "1", "--sample-tokens", "0", "--seed", "0"]


def run(variant: str, out: Path, steps: int) -> int:
    cmd = [sys.executable, "-m", "x_transformers", "train", *train_args(steps), *VARIANTS[variant],
           "--out", str(out / variant)]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    (out / variant / "versions.json").write_text(json.dumps(versions()) + "\n")  # the card that ran it
    return rc


def read(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"], [r for r in rows if r.get("kind") == "val"]


def summary(run_dir: Path) -> dict:
    train, val = read(run_dir)
    last = max(r["step"] for r in train)
    tail = [r["loss"] for r in train if r["step"] > last - 100]
    first_eval = min((r["step"] for r in val if r["step"] > 0), default=0)
    speed = [r["tokens_per_s"] for r in train if r["step"] > first_eval] or [r["tokens_per_s"] for r in train]
    return dict(steps=last, train_loss_last100=round(statistics.fmean(tail), 5),
                val_loss={r["step"]: round(r["val_loss"], 5) for r in val},
                tokens_per_s=round(statistics.median(speed), 1))


def versions() -> dict:
    import torch
    try:
        import torchao
        ao = torchao.__version__
    except ImportError:
        ao = None
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    return dict(card=card, torch=torch.__version__, torchao=ao, python=platform.python_version(),
                commit=os.environ.get("XT_COMMIT", commit))


def report(out: Path, path: Path | None) -> dict:
    runs = {v: summary(out / v) for v in VARIANTS if (out / v / "metrics.jsonl").exists()}
    if "bf16" not in runs:
        raise SystemExit(f"no bf16 run under {out}: run 'run bf16' first")
    base = runs["bf16"]
    for name, r in runs.items():
        common = sorted(set(r["val_loss"]) & set(base["val_loss"]), key=int)
        r["val_loss_rel_diff"] = {s: round(r["val_loss"][s] / base["val_loss"][s] - 1, 5) for s in common}
        r["train_loss_rel_diff"] = round(r["train_loss_last100"] / base["train_loss_last100"] - 1, 5)
        r["speed_vs_bf16"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        r["within_1pct"] = bool(common) and abs(r["val_loss_rel_diff"][common[-1]]) <= 0.01
    ran = out / "bf16" / "versions.json"  # the report may run elsewhere than the runs
    where = json.loads(ran.read_text()) if ran.exists() else versions()
    result = dict(benchmark="fp8 vs bf16 loss over training, xtransformers train --preset 1b --compile",
                  args=train_args(base["steps"]), **where, runs=runs)
    text = json.dumps(result, indent=1)
    print(text)
    if path is not None:
        path.write_text(text + "\n")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("variant", nargs="?", choices=list(VARIANTS))
    p.add_argument("--out", type=Path, required=True, help="folder of the runs")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--json", type=Path, help="where the report's JSON goes")
    a = p.parse_args()
    if a.action == "run":
        if a.variant is None:
            p.error("run needs a variant: " + ", ".join(VARIANTS))
        return run(a.variant, a.out, a.steps)
    report(a.out, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
