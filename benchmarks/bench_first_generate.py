"""First-call latency of ``generate()`` with the dynamic key/value cache (issue 22, item 4), ours
against the PyPI ``x-transformers`` package, each in its own fresh process.

The user's path: build a GPT-2-small-shaped model (bf16 on CUDA), run one forward (a training or
scoring step happened before), then time the first ``AutoregressiveWrapper.generate(prompt, 256)``
of the process, then the second (steady state). The first call pays every per-shape cost: the
dynamic cache grows by one key a step, so anything planned per key length (cuDNN attention builds
an execution plan per shape) is paid 256 times.

    PYTHONPATH=src python benchmarks/bench_first_generate.py --pypi-path DIR [--out FILE]
    # one variant in this process (what the driver runs in children):
    PYTHONPATH=src python benchmarks/bench_first_generate.py --child ours [--variant default|cudnn|profile]

``--variant cudnn`` lets SDPA use cuDNN attention on one-token decode steps (the behaviour before the
fix: XT_DECODE_SDPA_ALL_BACKENDS=1); ``profile`` prints the first call's top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

SHAPE = dict(vocab=50304, dim=768, depth=12, heads=12, max_seq_len=1024, prompt=16, new=256, warm_len=512)


def child(impl: str, variant: str, batch: int) -> dict:
    import torch

    if variant == "cudnn":
        os.environ["XT_DECODE_SDPA_ALL_BACKENDS"] = "1"
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    s = SHAPE if dev == "cuda" else dict(SHAPE, vocab=512, dim=128, depth=2, heads=4, new=32, warm_len=64)
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=s["vocab"], max_seq_len=s["max_seq_len"],
                             attn_layers=Decoder(dim=s["dim"], depth=s["depth"], heads=s["heads"]))
    ar = AutoregressiveWrapper(net).to(dev, dtype).eval()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():  # the one forward before: a scoring pass over a full-length batch
        net(torch.randint(0, s["vocab"], (batch, s["warm_len"]), device=dev))
    sync()
    prompt = torch.randint(0, s["vocab"], (batch, s["prompt"]), device=dev)
    kwargs = {} if impl == "pypi" else {"filter_logits_fn": "top_k"}  # both sample with top-k
    times = []
    for i in range(3):
        prof = None
        if variant == "profile" and i == 0:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t = time.perf_counter()
        ar.generate(prompt, s["new"], cache_kv=True, **kwargs)
        sync()
        times.append(time.perf_counter() - t)
        if prof is not None:
            prof.__exit__(None, None, None)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    out = dict(impl=impl, variant=variant, batch=batch, device=dev, first_call_s=round(times[0], 3),
               second_call_s=round(times[1], 3), steady_tokens_per_s=round(batch * s["new"] / min(times[1:]), 1),
               shape=s, torch=torch.__version__)
    if dev == "cuda":
        out["card"] = torch.cuda.get_device_name()
        out["sdp_cudnn_enabled"] = torch.backends.cuda.cudnn_sdp_enabled()
        order = getattr(torch._C, "_get_sdp_priority_order", None)
        out["sdp_priority_order"] = [str(b) for b in order()] if order else None
    return out


def run_child(impl: str, variant: str, batch: int, pypi_path: str | None) -> dict:
    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(os.path.dirname(here), "src")
    env["PYTHONPATH"] = (pypi_path if impl == "pypi" else src) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--variant", variant, "--batch", str(batch)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if variant == "profile":
        print(res.stdout[-6000:], flush=True)
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return dict(impl=impl, variant=variant, batch=batch, error=(res.stderr or res.stdout)[-2000:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=("ours", "pypi"))
    p.add_argument("--variant", default="default", choices=("default", "cudnn", "profile"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pypi-path", help="a folder holding the PyPI package (pip install --target)")
    p.add_argument("--out", help="JSON file (default $OUT/first_generate.json or benchmarks/results/)")
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.variant, args.batch)), flush=True)
        return
    rows = []
    plan = [("ours", "default", 1), ("ours", "cudnn", 1), ("ours", "profile", 1), ("ours", "default", 16)]
    if args.pypi_path:
        plan += [("pypi", "default", 1), ("pypi", "default", 16)]
    for impl, variant, batch in plan:
        rows.append(run_child(impl, variant, batch, args.pypi_path))
        print(json.dumps(rows[-1])[:600], flush=True)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        commit = None
    result = dict(benchmark="first generate() call, dynamic cache", commit=commit, python=platform.python_version(),
                  date=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), rows=rows)
    path = args.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                                    "first_generate.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
