"""Per-token overhead of ``generate()`` (issue 22, item 4): milliseconds and aten operators per
decoded token, ours (dynamic and static cache) against upstream x-transformers 2.31.10, each in its
own fresh process (the packages share the import name).

A decode step of a small model at batch 1 is bound by launches and Python, not by arithmetic. On
CPU the proxy keeps GPT-2-small's *layout* (depth 12, heads 12, dim_head = dim / heads) at a tiny
width (dim 96, vocabulary 256) so that the compute is negligible and what is timed is the per-token
overhead: Python work and the number of operators (each one a kernel launch on a GPU).

    # CPU proxy, ours against upstream (a folder holding the upstream package):
    PYTHONPATH=src python benchmarks/bench_decode_overhead.py --upstream /work/main/.upstream
    # on the GPU: the real GPT-2-small shape in bf16, first generate() after one forward, steady tok/s
    PYTHONPATH=src python benchmarks/bench_decode_overhead.py --device cuda --upstream DIR
    # one system in this process (what the driver runs in its children):
    PYTHONPATH=src python benchmarks/bench_decode_overhead.py --child ours --mode dynamic

Time per token: each interval from one call of the model to the next inside ``generate()`` (the
step, sampling and the wrapper's per-token work), its 10th percentile and median (robust on a shared
machine); also the marginal time of a token between two ``generate()`` lengths and, for the GPU,
the first call and the steady tokens per second (wall clock, synchronised).
Operators per token are counted by a ``TorchDispatchMode`` (aten operators after autograd's
decompositions; views counted apart, they launch nothing) as the difference between two whole
``generate()`` calls of different lengths, divided by the difference in tokens: the step, the
sampling and the wrapper's per-token work, counted the same way for both packages. Both sample with
top-k keeping 10% of the vocabulary (upstream's default filter), temperature 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = {
    "cpu": dict(vocab=256, dim=96, depth=12, heads=12, max_seq_len=1024, prompt=16, new=256, warm_len=64),
    "cuda": dict(vocab=50304, dim=768, depth=12, heads=12, max_seq_len=1024, prompt=16, new=256, warm_len=512),
}


class OpCounter:
    """Counts the aten operators run inside ``with`` (a TorchDispatchMode), views apart."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops[str(func.overloadpacket.__name__)] += 1
                if func.is_view:
                    counter.views += 1
                return func(*args, **(kwargs or {}))

        self.mode, self.ops, self.views = Mode(), Counter(), 0

    def __enter__(self):
        self.ops.clear()
        self.views = 0
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def child(impl: str, mode: str, device: str, new: int | None) -> dict:
    import torch

    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    s = dict(SHAPES[device])
    s["new"] = new or s["new"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=s["vocab"], max_seq_len=s["max_seq_len"],
                             attn_layers=Decoder(dim=s["dim"], depth=s["depth"], heads=s["heads"],
                                                 attn_dim_head=s["dim"] // s["heads"]))
    ar = AutoregressiveWrapper(net).to(device, dtype).eval()
    kw = dict(cache_kv=True)
    if impl == "ours":  # upstream's defaults: top-k (10%) and the window at max_seq_len (never reached here)
        kw |= dict(filter_logits_fn="top_k", static_cache=mode == "static")
    with torch.no_grad():  # the one forward before: a scoring pass
        net(torch.randint(0, s["vocab"], (1, s["warm_len"]), device=device))
    sync()
    prompt = torch.randint(0, s["vocab"], (1, s["prompt"]), device=device)

    # on CPU the process's CPU time (one thread): what the step costs, less the noise of a shared machine
    clock = time.perf_counter if device == "cuda" else time.process_time

    def generate(n):
        sync()
        t = clock()
        ar.generate(prompt, n, **kw)
        sync()
        return clock() - t

    first = generate(s["new"])
    steady = min(generate(s["new"]) for _ in range(3))
    short = min(generate(s["new"] // 2) for _ in range(3))
    # the time from one call of the model to the next (a decode step, sampling and the wrapper's
    # per-token work), each interval apart: its low percentiles are what a step costs, where whole
    # calls on a busy machine take every interruption along
    stamps = []
    hook = net.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    intervals = []
    for _ in range(3):
        stamps.clear()
        ar.generate(prompt, s["new"], **kw)
        sync()
        intervals += [b - a for a, b in zip(stamps[2:], stamps[3:])]
    hook.remove()
    intervals.sort()
    pct = lambda q: round(1000 * intervals[int(q * (len(intervals) - 1))], 3)  # noqa: E731
    counts = []
    for n in (8, 24):  # ops per token: the difference of two lengths (prefill and set-up cancel)
        with OpCounter() as c:
            ar.generate(prompt, n, **kw)
        counts.append((c.total, c.views, Counter(c.ops)))
    per_token = (counts[1][0] - counts[0][0]) / 16
    views = (counts[1][1] - counts[0][1]) / 16
    top = (counts[1][2] - counts[0][2]).most_common(25)
    out = dict(impl=impl, mode=mode, device=device, dtype=str(dtype).split(".")[-1], shape=s,
               first_call_s=round(first, 3), steady_call_s=round(steady, 3),
               steady_tokens_per_s=round(s["new"] / steady, 1),
               # the marginal cost of a token (half the tokens timed apart): prefill and set-up cancel
               ms_per_token=round(1000 * (steady - short) / (s["new"] - s["new"] // 2), 3),
               step_ms_p10=pct(0.1), step_ms_median=pct(0.5),
               aten_ops_per_token=per_token, view_ops_per_token=views,
               top_ops_per_token={k: v / 16 for k, v in top}, torch=torch.__version__,
               clock="wall" if device == "cuda" else "process CPU time",
               threads=torch.get_num_threads())
    if impl == "upstream":
        from importlib.metadata import version
        out["version"] = version("x-transformers")
    return out


def run_child(impl: str, mode: str, device: str, upstream: str | None, new: int | None) -> dict:
    env = dict(os.environ)
    path = upstream if impl == "upstream" else os.path.join(os.path.dirname(HERE), "src")
    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--mode", mode, "--device", device]
    if new:
        cmd += ["--new", str(new)]
    with tempfile.TemporaryDirectory() as cwd:  # not the repository root: no src/ shadowing upstream
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return dict(impl=impl, mode=mode, error=(res.stderr or res.stdout)[-3000:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=("ours", "upstream"))
    p.add_argument("--mode", default="dynamic", choices=("dynamic", "static"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--new", type=int, default=None, help="tokens per generate() (default 256)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per system (best of them)")
    p.add_argument("--upstream", default=os.environ.get("XT_UPSTREAM"),
                   help="folder holding upstream x-transformers 2.31.10 (default $XT_UPSTREAM)")
    p.add_argument("--out", help="JSON file (default decode_overhead_<device>.json in $OUT or benchmarks/results/)")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.mode, args.device, args.new)), flush=True)
        return
    sys.path.insert(0, HERE)
    from common import environment

    plan = [("ours", "dynamic"), ("ours", "static")] + ([("upstream", "dynamic")] if args.upstream else [])
    rows = {}
    for _ in range(args.rounds):  # rounds alternate the systems so a busy machine slows them alike
        for impl, mode in plan:
            r = run_child(impl, mode, args.device, args.upstream, args.new)
            key = f"{impl}, {mode}"
            if "error" in r:
                print(key, "failed:", r["error"], file=sys.stderr)
                rows.setdefault(key, r)
                continue
            old = rows.get(key)
            if old is None or "error" in old or r["step_ms_p10"] < old["step_ms_p10"]:
                first = min(r["first_call_s"], old["first_call_s"]) if old and "error" not in old else r["first_call_s"]
                rows[key] = dict(r, first_call_s=first)
    up = rows.get("upstream, dynamic")
    print(f"\n{'system':<20}{'step ms p10':>12}{'median':>8}{'ms/token':>10}{'tok/s':>9}{'first s':>9}"
          f"{'ops/token':>11}{'views':>7}{'vs upstream':>13}")
    for key, r in rows.items():
        if "error" in r:
            print(f"{key:<20} failed")
            continue
        ratio = up["step_ms_p10"] / r["step_ms_p10"] if up and "error" not in up else float("nan")
        r["speedup_vs_upstream"] = round(ratio, 3)  # by the step's 10th percentile
        print(f"{key:<20}{r['step_ms_p10']:>12.3f}{r['step_ms_median']:>8.3f}{r['ms_per_token']:>10.3f}"
              f"{r['steady_tokens_per_s']:>9.1f}{r['first_call_s']:>9.3f}"
              f"{r['aten_ops_per_token']:>11.1f}{r['view_ops_per_token']:>7.1f}{ratio:>12.2f}x")
    result = dict(benchmark="decode overhead per token (generate, batch 1)", **environment(), rows=rows)
    folder = os.environ.get("OUT") or os.path.join(HERE, "results")
    os.makedirs(folder, exist_ok=True)
    path = args.out or os.path.join(folder, f"decode_overhead_{args.device}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
