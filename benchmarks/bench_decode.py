"""Decoding speed: ours (dynamic cache, static cache, static + compiled decode step) against the
PyPI ``x-transformers`` package, which has the same import name and so runs in its own process.

GPU (GPT-2-small shape, 16-token prompt, 256 new tokens, batch 1 and 16):
    PYTHONPATH=src python benchmarks/bench_decode.py --dtype bf16 --pypi-wheels .whl/xt
CPU (this machine's small shape):
    PYTHONPATH=src python benchmarks/bench_decode.py --quick --pypi-path /tmp/xt_pypi

Both sides sample with top-k (10% of the vocabulary kept), PyPI's default filter. Prints a table
and writes JSON (to $OUT when set, else benchmarks/results/) naming the card, torch version and
git commit, with the ratio of each of our modes to the PyPI package at each batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Run with the PyPI package first on sys.path (PYTHONPATH=<its folder>), never our src/.
PYPI_SCRIPT = r"""
import json, sys, time, torch
import x_transformers
from x_transformers import TransformerWrapper, Decoder, AutoregressiveWrapper
cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
net = TransformerWrapper(num_tokens=cfg["vocab"], max_seq_len=cfg["max_seq_len"],
                         attn_layers=Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"]))
ar = AutoregressiveWrapper(net).to(dev, dtype).eval()
out = {"version": getattr(x_transformers, "__version__", None) or __import__("importlib.metadata").metadata.version("x-transformers"),
       "file": x_transformers.__file__, "results": {}}
for b in cfg["batches"]:
    prompt = torch.randint(0, cfg["vocab"], (b, cfg["prompt"]), device=dev)
    ar.generate(prompt, cfg["warmup_tokens"], cache_kv=True)
    times = []
    for _ in range(cfg["repeats"]):
        if dev == "cuda": torch.cuda.synchronize()
        t = time.perf_counter()
        ar.generate(prompt, cfg["new"], cache_kv=True)
        if dev == "cuda": torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out["results"][str(b)] = b * cfg["new"] / min(times)
print("RESULT " + json.dumps(out))
"""


def git_commit():
    if os.environ.get("XT_COMMIT"):  # a copied tree's git HEAD can be stale on the device machine
        return os.environ["XT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - a tarball without git
        return None


def run_pypi(cfg, pypi_path):
    env = dict(os.environ, PYTHONPATH=pypi_path)
    proc = subprocess.run([sys.executable, "-c", PYPI_SCRIPT, json.dumps(cfg)], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())  # not the repo root: no src/ shadowing
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            if not os.path.realpath(res["file"]).startswith(os.path.realpath(pypi_path)):
                raise RuntimeError(f"the PyPI run imported {res['file']}, not the package in {pypi_path}")
            return res
    raise RuntimeError(f"PyPI x-transformers run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def install_wheels(wheel_dir):
    target = tempfile.mkdtemp(prefix="xt_pypi_")
    wheels = [os.path.join(wheel_dir, f) for f in os.listdir(wheel_dir) if f.endswith(".whl")]
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", target, *wheels])
    return target


def make_ours(cfg, mode):
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    torch.manual_seed(0)
    dev, dtype = cfg["device"], DTYPES[cfg["dtype_key"]]
    net = TransformerWrapper(num_tokens=cfg["vocab"], max_seq_len=cfg["max_seq_len"],
                             attn_layers=Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"]))
    ar = AutoregressiveWrapper(net.to(dev, dtype).eval())
    kw = dict(filter_logits_fn="top_k", filter_kwargs=dict(frac=0.1))
    if mode == "static":
        kw["static_cache"] = True
    elif mode == "static+compile":
        kw["compile"] = True
    compile_s = {}
    for b in cfg["batches"]:
        prompt = torch.randint(0, cfg["vocab"], (b, cfg["prompt"]), device=dev)
        t = time.perf_counter()
        for _ in range(2 if mode == "static+compile" else 1):  # compile, then record the CUDA graph
            ar.generate(prompt, cfg["new"], **kw)
        compile_s[str(b)] = time.perf_counter() - t
    return ar, kw, compile_s


def run_ours(cfg, ar, kw):
    results, dev = {}, cfg["device"]
    for b in cfg["batches"]:
        prompt = torch.randint(0, cfg["vocab"], (b, cfg["prompt"]), device=dev)
        times = []
        for _ in range(cfg["repeats"]):
            if dev == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            ar.generate(prompt, cfg["new"], **kw)
            if dev == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        results[str(b)] = b * cfg["new"] / min(times)
    return results


def best(a, b):
    return b if a is None else {k: max(a[k], b[k]) for k in a}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU shape: dim 256, depth 4, vocab 256, batch 1")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 256; 128 with --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed generate() calls per system and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["dynamic", "static", "static+compile"])
    ap.add_argument("--pypi-path", default=None, help="a folder where x-transformers is installed (--target)")
    ap.add_argument("--pypi-wheels", default=None, help="a folder of wheels: x-transformers and its deps")
    ap.add_argument("--no-pypi", action="store_true")
    args = ap.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_key = args.dtype or ("bf16" if dev == "cuda" else "fp32")
    shape = dict(vocab=256, dim=256, depth=4, heads=4) if args.quick else dict(vocab=50304, dim=768, depth=12, heads=12)
    new = args.new or (128 if args.quick else 256)
    cfg = dict(**shape, device=dev, dtype=str(DTYPES[dtype_key]).split(".")[-1], dtype_key=dtype_key,
               batches=args.batches or ([1] if args.quick else [1, 16]), prompt=args.prompt, new=new,
               max_seq_len=1024, repeats=args.repeats, warmup_tokens=16)
    card = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or platform.machine()
    print(f"device {card}, torch {torch.__version__}, {dtype_key}, shape {shape}, prompt {args.prompt}, new {new}")

    path = None
    if not args.no_pypi:
        path = args.pypi_path or (install_wheels(args.pypi_wheels) if args.pypi_wheels else None)
        if path is None:
            sys.exit("give --pypi-path or --pypi-wheels (or --no-pypi)")
    ours, compile_times = {}, {}
    for mode in args.modes:
        *ours[mode], compile_times[mode] = make_ours(cfg, mode)
    # Rounds alternate the systems so that a busy machine slows them alike; best of all rounds.
    pypi, rows = None, {}
    for _ in range(args.rounds):
        if path is not None:
            res = run_pypi(cfg, path)
            pypi = res if pypi is None else dict(res, results=best(pypi["results"], res["results"]))
        for mode, (ar, kw) in ours.items():
            rows[f"ours, {mode}"] = best(rows.get(f"ours, {mode}"), run_ours(cfg, ar, kw))
    if pypi is not None:
        rows = {f"pypi x-transformers {pypi['version']} (cache_kv=True)": pypi["results"], **rows}

    batches = [str(b) for b in cfg["batches"]]
    print(f"\n{'system':<48}" + "".join(f"{'b=' + b + ' tok/s':>16}{'ratio':>8}" for b in batches))
    ratios = {}
    for name, res in rows.items():
        line = f"{name:<48}"
        for b in batches:
            r = res[b] / pypi["results"][b] if pypi else float("nan")
            ratios.setdefault(name, {})[b] = r
            line += f"{res[b]:>16,.0f}{r:>7.2f}x"
        print(line)

    out = dict(benchmark="decode", card=card, device=dev, torch=torch.__version__, commit=git_commit(),
               dtype=dtype_key, shape=shape, prompt=args.prompt, new_tokens=new, batches=cfg["batches"],
               threads=torch.get_num_threads(), rounds=args.rounds, repeats=args.repeats,
               tokens_per_s=rows, ratio_to_pypi=ratios, warmup_s=compile_times,
               pypi_version=pypi["version"] if pypi else None, time=time.strftime("%Y-%m-%d %H:%M:%S"))
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    name = f"decode_{'cpu_quick' if args.quick else dev}_{dtype_key}.json"
    with open(os.path.join(folder, name), "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {os.path.join(folder, name)}")


if __name__ == "__main__":
    main()
