"""Peak training memory against depth, with and without ``reversible=True`` (Reformer, 2001.04451).

One training step (forward + backward of a causal LM loss) of a Decoder at depths 6, 12, 24, 48.
"Peak training memory" is the weights plus everything allocated during the step (activations,
gradients); the optimizer state is left out (it is the same with and without reversible).

  CUDA: torch.cuda.max_memory_allocated() of the measured step (after one warm-up step).
  CPU:  each configuration runs in a fresh process; the step's memory is the growth of peak RSS
        (ru_maxrss) over the RSS before the step, plus the bytes of the weights. The process runs
        with MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows live tensors (see measure_cpu).

Criterion (issue 4): with reversible, the peak at depth 48 is within 1.5x of the peak at depth 6.
The weights and gradients grow with depth in both models, so the criterion holds only where one
layer's activations dominate the weights (many tokens per step against a modest dim).

Prints a table; writes JSON to $OUT if set, else benchmarks/results/. Usage:
  PYTHONPATH=src python benchmarks/bench_memory.py            # CUDA if available, else CPU
  PYTHONPATH=src python benchmarks/bench_memory.py --quick    # tiny shapes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEPTHS = (6, 12, 24, 48)
SHAPES = {  # dim, heads, batch, seq
    "cuda": dict(dim=256, heads=4, batch=16, seq=4096),
    "cpu": dict(dim=64, heads=4, batch=32, seq=256),
    "quick": dict(dim=32, heads=4, batch=4, seq=64),
}


def build(depth, reversible, shape, device):
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    layers = Decoder(dim=shape["dim"], depth=depth, heads=shape["heads"], reversible=reversible, rotary_pos_emb=True)
    return TransformerWrapper(num_tokens=256, max_seq_len=shape["seq"], attn_layers=layers).to(device).train()


def step(model, tokens, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item()


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_cuda(depth, reversible, shape):
    device = torch.device("cuda")
    model = build(depth, reversible, shape, device)
    tokens = torch.randint(0, 256, (shape["batch"], shape["seq"] + 1), device=device)
    step(model, tokens, device)  # warm-up: kernels, workspaces
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step(model, tokens, device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return dict(peak_bytes=peak, seconds=seconds)


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def worker(depth, reversible, shape):
    """CPU, in a fresh process: the step's growth of peak RSS, plus the weights."""
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  torch.autograd.grad imports it lazily (~30 MB)

    device = torch.device("cpu")
    model = build(depth, reversible, shape, device)
    tokens = torch.randint(0, 256, (shape["batch"], shape["seq"] + 1))
    before = _rss_bytes()
    t = time.perf_counter()
    step(model, tokens, device)
    seconds = time.perf_counter() - t
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return dict(peak_bytes=max(peak_rss - before, 0) + weight_bytes(model), seconds=seconds)


def measure_cpu(depth, reversible, shape):
    cmd = [sys.executable, __file__, "--worker", str(depth), str(int(reversible)), json.dumps(shape)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # glibc raises its mmap threshold as large blocks are freed, then serves tensors from a heap that
    # fragments and never shrinks: RSS would track allocation history, not live memory. A fixed
    # threshold maps every tensor block on its own and returns it to the OS when freed.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "") if head else "unknown"
    except OSError:
        return "unknown"


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(worker(int(sys.argv[2]), bool(int(sys.argv[3])), json.loads(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, depths 2 and 8 (a smoke test)")
    parser.add_argument("--depths", type=int, nargs="+", default=None)
    args = parser.parse_args()

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    shape = SHAPES["quick" if args.quick else device]
    depths = tuple(args.depths or ((2, 8) if args.quick else DEPTHS))
    measure = measure_cuda if device == "cuda" else measure_cpu
    card = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()

    rows = []
    for reversible in (False, True):
        for depth in depths:
            r = measure(depth, reversible, shape)
            rows.append(dict(depth=depth, reversible=reversible, **r))
            print(f"  depth {depth:3d} reversible={reversible!s:5}  peak {r['peak_bytes'] / 2**20:9.1f} MiB  "
                  f"step {r['seconds'] * 1e3:8.1f} ms", flush=True)

    def peak(depth, reversible):
        return next(r["peak_bytes"] for r in rows if r["depth"] == depth and r["reversible"] == reversible)

    def secs(depth, reversible):
        return next(r["seconds"] for r in rows if r["depth"] == depth and r["reversible"] == reversible)

    lo, hi = min(depths), max(depths)
    growth = {rev: peak(hi, rev) / peak(lo, rev) for rev in (False, True)}
    print(f"\n{card}, torch {torch.__version__}, shape {shape}")
    print("| depth | plain MiB | reversible MiB | reversible / plain | time ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for d in depths:
        print(f"| {d} | {peak(d, False) / 2**20:.1f} | {peak(d, True) / 2**20:.1f} | "
              f"{peak(d, True) / peak(d, False):.2f} | {secs(d, True) / secs(d, False):.2f} |")
    ok = growth[True] <= 1.5
    print(f"\npeak(depth {hi}) / peak(depth {lo}): plain {growth[False]:.2f}x, reversible {growth[True]:.2f}x "
          f"(criterion <= 1.5x: {'PASS' if ok else 'FAIL'})")

    result = dict(
        benchmark="bench_memory", device=device, card=card, torch=torch.__version__, commit=git_commit(),
        shape=shape, depths=depths, dtype="bf16 autocast" if device == "cuda" else "float32",
        measure="max_memory_allocated" if device == "cuda" else "peak RSS growth + weights", rows=rows,
        growth_plain=growth[False], growth_reversible=growth[True], criterion_pass=ok, quick=args.quick,
    )
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"bench_memory_{device}{'_quick' if args.quick else ''}.json"
    (out_dir / name).write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / name}")


if __name__ == "__main__":
    main()
