"""GPU check: compiled static-cache decoding equals the uncached loop, for every cacheable feature,
one model after another in ONE process (issue 25: a process that had compiled one model's decode
step broke the next models' compiles).

For the five configurations of the issue, then every feature the test harness registers as
cacheable for decoders (tests/features/*.py), each in a decoder of its own: greedy decoding of
ragged prompts (lengths 5, 17, 9, 1) with ``generate(compile=True)`` (static cache, decode step
compiled with fullgraph=True, CUDA graphs on GPU) must give the uncached loop's tokens (explicit
attention backend) exactly, in float32 (TF32 off). The issue's five also decode a second batch size (2 rows of 8 tokens).
Recorded per call: whether compiled == uncached, whether the uncompiled static cache agrees too
(to tell a compile difference from a cache one), the first differing step, the seconds of the
first compiled call (compile + decode), and how often inductor skipped CUDA graphs (noted, not a
failure: the step is still compiled). A configuration that raises, or whose decode step fell
back to the uncompiled one (generate's one-line warning), is a failure recorded with its one-line
message; the sweep goes on.

    PYTHONPATH=src python benchmarks/gpu_check_decode.py                      # GPU: configurations not started
                                                                              # within --budget-s (240) are skipped, listed
    PYTHONPATH=src python benchmarks/gpu_check_decode.py --device cpu --quick # smoke check on CPU

JSON goes to $OUT when set, else benchmarks/results/ (rewritten after every configuration).
Exit 1 if any configuration failed.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from common import environment, write_result  # noqa: E402
from harness import load_features, merge  # noqa: E402

from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper  # noqa: E402
from x_transformers.attend import attend_backend  # noqa: E402

ISSUE_CONFIGS = {  # the issue's sweep: name -> (layer keywords, wrapper keywords)
    "issue:plain": ({}, {}),
    "issue:rotary_kv_heads": (dict(rotary_pos_emb=True, attn_kv_heads=2), {}),
    "issue:alibi": (dict(alibi_pos_bias=True), {}),
    "issue:t5_mem_kv": (dict(rel_pos_bias=True, attn_num_mem_kv=2), {}),
    "issue:qk_norm_glu": (dict(attn_qk_norm=True, ff_glu=True), {}),
}
VOCAB = 256


def configurations():
    configs = dict(ISSUE_CONFIGS)
    for name, feature in load_features().items():
        if feature.cacheable and "decoder" in feature.kinds:
            configs[name] = merge([feature])
    return configs


def build(layers, wrapper, shape, max_seq_len, device):
    layers = dict(layers)
    if "tupe_max_seq_len" in layers:  # TUPE's position table must cover prompt + new tokens
        layers["tupe_max_seq_len"] = max_seq_len
    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=VOCAB, max_seq_len=max_seq_len, **wrapper,
                             attn_layers=Decoder(dim=shape["dim"], depth=shape["depth"], heads=shape["heads"], **layers))
    return AutoregressiveWrapper(net.to(device)).eval()


def first_difference(a, b):
    diff = (a != b).any(dim=0).nonzero()
    return int(diff[0]) if len(diff) else None


def one_line(error) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def check_call(ar, prompts, new, compile):
    """Decode ``prompts`` uncached, with the uncompiled static cache, and compiled; the row of results."""
    # The reference runs on the explicit backend: its sequence grows every step, and on the flex
    # path (ALiBi on GPU) each length would compile a kernel of its own.
    with attend_backend("explicit"):
        want = ar.generate(prompts, new, temperature=0.0, cache_kv=False)
    static = ar.generate(prompts, new, temperature=0.0, static_cache=True)
    skips = counters["inductor"]["cudagraph_skips"]
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ar.generate(prompts, new, temperature=0.0, compile=compile)
    seconds = time.perf_counter() - t
    fallback = [str(w.message) for w in caught if "does not compile" in str(w.message)]
    batch = len(prompts) if isinstance(prompts, list) else prompts.shape[0]
    row = dict(batch=batch, compiled_equal=bool(torch.equal(got, want)), static_equal=bool(torch.equal(static, want)),
               first_diff_step=first_difference(got, want), first_call_s=round(seconds, 2),
               cudagraph_skips=counters["inductor"]["cudagraph_skips"] - skips)
    if fallback:
        row["error"] = fallback[0]
    row["passed"] = row["compiled_equal"] and not fallback
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens (a smoke check; CPU is fine)")
    ap.add_argument("--backend", default=None,
                    help="compile with this torch.compile backend instead of compile=True (e.g. aot_eager)")
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run (default: all)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip configurations not started within this many seconds (default 240; none with --quick)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: token-exact comparisons
    torch.backends.cudnn.allow_tf32 = False
    shape = dict(dim=32, depth=1, heads=4) if args.quick else dict(dim=256, depth=2, heads=8)  # dim_head 32: flex-eligible
    new = 6 if args.quick else 48
    budget = args.budget_s if args.budget_s is not None else (None if args.quick else 240.0)
    compile = True if args.backend is None else dict(backend=args.backend)

    g = torch.Generator().manual_seed(0)
    ragged = [torch.randint(1, VOCAB, (n,), generator=g).to(device) for n in (5, 17, 9, 1)]
    second = torch.randint(1, VOCAB, (2, 8), generator=g).to(device)
    configs = configurations()
    if args.only:
        unknown = sorted(set(args.only) - set(configs))
        if unknown:
            sys.exit(f"unknown configurations {unknown}; valid: {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.only}

    t0 = time.perf_counter()
    rows, skipped = [], []
    record = dict(check="compiled_static_decode_vs_uncached", device=device.type, dtype="float32",
                  compile="compile=True" if args.backend is None else f"backend={args.backend}",
                  shape=shape, new_tokens=new, prompts=dict(ragged=[5, 17, 9, 1], second_batch=[2, 8]),
                  rows=rows, skipped=skipped, **environment())

    def save():
        record.update(passed=all(r["passed"] for r in rows), elapsed_s=round(time.perf_counter() - t0, 1))
        return write_result("check_decode" + ("_quick" if args.quick else ""), record)

    for name, (layers, wrapper) in configs.items():
        if budget is not None and time.perf_counter() - t0 > budget:
            skipped.append(name)
            continue
        calls = [ragged, second] if name.startswith("issue:") else [ragged]  # one model, then a second batch size
        ar = None
        for prompts in calls:
            row = dict(config=name, layers={k: repr(v) for k, v in layers.items()}, wrapper=wrapper)
            try:
                if ar is None:
                    ar = build(layers, wrapper, shape, max_seq_len=128, device=device)
                row.update(check_call(ar, prompts, new, compile))
            except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
                row.update(passed=False, error=one_line(e), detail=str(e)[:2000])
            rows.append(row)
            status = "ok" if row["passed"] else "FAIL " + row.get("error", f"differs from step {row.get('first_diff_step')}")
            if row.get("cudagraph_skips"):
                status += " (CUDA graphs skipped: compiled without them)"
            print(f"{name:<26} b={row.get('batch', '-'):<3} {row.get('first_call_s', '-'):>7}s  {status}", flush=True)
            save()

    path = save()
    failed = [r for r in rows if not r["passed"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} passed, {len(skipped)} skipped (time budget)"
          f"{': ' + ', '.join(skipped) if skipped else ''}; {time.perf_counter() - t0:.0f} s; wrote {path}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
