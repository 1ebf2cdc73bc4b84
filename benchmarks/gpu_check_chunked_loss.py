"""GPU check: the chunked next-token loss, compiled together with the model, computes what eager
and the float32 reference compute (issue: compiled training diverged at a 1B-like shape).

For each configuration (one factor at a time around the shape that failed: dim 2048, depth 16,
vocabulary 50304, tied head, 8 x 2048 tokens, bf16 autocast) and each variant:

- ``reference``: eager, ``F.cross_entropy`` on float32 logits ``h.float() @ W.float().T``;
- ``eager``: eager ``chunked_cross_entropy``;
- ``compiled``: ``torch.compile`` of forward + ``chunked_cross_entropy`` as one function (what
  ``xtransformers train --compile`` runs);
- diagnostic variants (``--variants``): ``compiled_flat`` (the training command's form: hidden
  states and targets flattened before the loss), ``aot_eager`` (dynamo + AOTAutograd, no
  inductor), ``compiled_plain`` (forward + ``F.cross_entropy`` on the logits, compiled),
  ``compiled_model`` (the module compiled, the loss eager).

It records the loss, every parameter's relative gradient error ``||g - g_ref|| / ||g_ref||``
against the reference and against the eager chunked loss, and the step time. A configuration
passes when every compiled variant's loss is within 1e-3 of eager's and every parameter's gradient
within the bf16 noise floor of eager's (1%, or twice eager's own worst error against the float32
reference if larger), on the first call (which compiles and autotunes) and on the second.
``--judge FILE`` re-applies that rule to a result file. Results go to one JSON (``check_chunked_loss_gpu.json``), rewritten after every
configuration; with ``--resume FILE`` the configurations already in FILE are kept, not rerun.
Compilation runs with the library's guard against pytorch#190517 (``x_transformers.inductor_fix``,
installed on import, as users get it); ``XT_INDUCTOR_FIX=0`` checks torch's own code generation.

    PYTHONPATH=src python benchmarks/gpu_check_chunked_loss.py [--only NAME ...] [--resume FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

from x_transformers import Decoder, TransformerWrapper  # noqa: E402
from x_transformers.loss import chunked_cross_entropy  # noqa: E402

BASE = dict(dim=2048, depth=16, heads=16, vocab=50304, tied=True, batch=8, seq=2048, ignored=0.0)
# one factor at a time around BASE (at most ~1.5B parameters each)
CONFIGS = {
    "base": {},
    "depth1": dict(depth=1),
    "depth4": dict(depth=4),
    "depth32_dim768": dict(depth=32, dim=768, heads=12),
    "dim768": dict(dim=768, heads=12),
    "dim4096_depth4": dict(dim=4096, depth=4, heads=32),
    "vocab32k": dict(vocab=32000),
    "vocab128k_depth8": dict(vocab=128256, depth=8),
    "untied": dict(tied=False),
    "ignored30": dict(ignored=0.3),
    "gpt2_small": dict(dim=768, depth=12, heads=12, batch=16, seq=1024),
    "untied_ignored_depth4": dict(tied=False, ignored=0.3, depth=4),
}
# A compiled variant passes when its loss is within LOSS_TOL of eager's and every parameter's gradient
# within the bf16 noise floor of eager's: GRAD_TOL, or twice eager's own worst error against the
# float32 reference when that is larger (two bf16 computations that sum in different orders each
# err by about that much, so they may differ from each other by up to twice it). The race of issue
# 24 gave loss errors of 0.047-0.054 and gradient errors of 9-14%; bf16 noise at depth 32 and dim
# 4096 gives loss errors below 1e-4 and gradient errors of 1.0-1.3% (eager vs float32: 0.7-0.9%).
LOSS_TOL, GRAD_TOL = 1e-3, 0.01


def grad_tolerance(row: dict) -> float:
    eager = row["variants"].get("eager", {})
    return max(GRAD_TOL, 2 * eager.get("worst_vs_reference", 0.0))


def judge(row: dict) -> dict:
    """Set each compiled variant's ``passed`` and the row's, by the rule above."""
    tol = grad_tolerance(row)
    row["grad_tolerance"] = tol
    for v, e in row["variants"].items():
        if v == "eager" or "error" in e:
            continue
        second_loss = e.get("second_call_loss_vs_eager", e["loss_vs_eager"])  # older files: first call only
        second_grad = e.get("second_call_worst_vs_eager", e["worst_vs_eager"])
        e["passed"] = (e["loss_vs_eager"] <= LOSS_TOL and second_loss <= LOSS_TOL
                       and e["worst_vs_eager"] <= tol and second_grad <= tol
                       and not e["missing_grads"] and not e.get("missing_vs_eager"))
    row["passed"] = all(e.get("passed", False) for v, e in row["variants"].items() if v != "eager")
    return row


def build(cfg):
    torch.manual_seed(0)
    # the shape the issue measured: head width dim // heads, LayerNorm with bias, an unscaled tied head
    # (the library's defaults became upstream's since: 64-wide heads, no norm bias, tied logits * dim ** -0.5)
    model = TransformerWrapper(num_tokens=cfg["vocab"], max_seq_len=cfg["seq"], tie_embedding=cfg["tied"],
                               logits_scale=1.0,
                               attn_layers=Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"],
                                                   attn_dim_head=cfg["dim"] // cfg["heads"], norm_bias=True))
    return model.cuda()


def batch(cfg):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randint(0, 256, (cfg["batch"], cfg["seq"] + 1), device="cuda", generator=g)
    target = x[:, 1:].clone()
    if cfg["ignored"]:
        drop = torch.rand(target.shape, device="cuda", generator=g) < cfg["ignored"]
        target = target.masked_fill(drop, -100)
    return x[:, :-1], target  # a strided slice, as a training step takes it


def loss_fns(model):
    def chunked(x, target):
        h = model(x, return_embeddings=True)
        return chunked_cross_entropy(h, model.logits_weight, target)

    def chunked_flat(x, target):  # the form the training command and the reproducer use
        h = model(x, return_embeddings=True)
        return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), model.logits_weight, target.reshape(-1))

    def plain(x, target):
        return F.cross_entropy(model(x).flatten(0, 1).float(), target.flatten(), ignore_index=-100)

    def model_only():  # the module compiled, the loss eager (the training command before round 4)
        compiled = torch.compile(model)
        return lambda x, target: chunked_cross_entropy(compiled(x, return_embeddings=True), model.logits_weight, target)

    def reference(x, target):
        h = model(x, return_embeddings=True)
        logits = h.float() @ model.logits_weight.float().t()
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)

    # built when asked for, after torch._dynamo.reset(): no variant reuses another's compiled code
    return dict(reference=lambda: reference, eager=lambda: chunked, compiled=lambda: torch.compile(chunked),
                aot_eager=lambda: torch.compile(chunked, backend="aot_eager"),
                compiled_plain=lambda: torch.compile(plain), compiled_model=model_only, eager_flat=lambda: chunked_flat,
                compiled_flat=lambda: torch.compile(chunked_flat))


def train_curve(cfg, fn_name, steps, lr=3e-4):
    """Per-step losses of ``steps`` fused-AdamW steps (no warm-up) from the same initialisation."""
    model = build(cfg)
    fn = loss_fns(model)[fn_name]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    g = torch.Generator(device="cuda").manual_seed(2)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 256, (cfg["batch"], cfg["seq"] + 1), device="cuda", generator=g)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    del model, opt
    torch.cuda.empty_cache()
    return losses


def step(model, fn, x, target, keep=True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(x, target)
    loss.backward()
    if keep:
        return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def rel_errors(grads, ref):
    missing = sorted(set(ref) - set(grads))
    errs = {n: ((grads[n] - ref[n]).norm() / ref[n].norm().clamp(min=1e-30)).item() for n in ref if n in grads}
    return errs, missing


def check(name, overrides, variants):
    cfg = {**BASE, **overrides}
    model = build(cfg)
    params = sum(p.numel() for p in model.parameters())
    x, target = batch(cfg)
    fns = loss_fns(model)
    row = {"config": cfg, "params": params, "variants": {}}
    ref_loss, ref_grads = step(model, fns["reference"](), x, target)
    row["reference_loss"] = ref_loss
    eager_grads = None
    for v in ["eager", *variants]:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            fn = fns[v]()
            loss, grads = step(model, fn, x, target)
        except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
            row["variants"][v] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(name, v, row["variants"][v], flush=True)
            continue
        first = time.perf_counter() - t0
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss2, grads2 = step(model, fn, x, target)  # a second call: no compiling, no autotuning
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t1
        errs_ref, missing = rel_errors(grads, ref_grads)
        entry = {"loss": loss, "first_call_s": round(first, 2), "step_s": round(seconds, 4), "missing_grads": missing,
                 "worst_vs_reference": max(errs_ref.values()),
                 "worst_param_vs_reference": max(errs_ref, key=errs_ref.get),
                 "token_emb_vs_reference": errs_ref.get("token_emb.weight")}
        if v == "eager":
            eager_grads, eager_loss = grads, loss
        else:
            errs_e, missing_e = rel_errors(grads, eager_grads)
            entry.update(loss_vs_eager=abs(loss - eager_loss), worst_vs_eager=max(errs_e.values()),
                         worst_param_vs_eager=max(errs_e, key=errs_e.get),
                         worst5_vs_eager=sorted(errs_e.items(), key=lambda kv: -kv[1])[:5])
            errs_2, _ = rel_errors(grads2, eager_grads)
            entry.update(second_call_loss_vs_eager=abs(loss2 - eager_loss), second_call_worst_vs_eager=max(errs_2.values()))
            entry["missing_vs_eager"] = missing_e
        row["variants"][v] = entry
        print(name, v, json.dumps({k: entry[k] for k in entry if k != "worst5_vs_eager"}), flush=True)
    judge(row)
    del model, fns
    torch.cuda.empty_cache()
    return row


def _guarded() -> bool:
    from x_transformers import inductor_fix
    return inductor_fix._APPLIED


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help=f"configurations to run, of {list(CONFIGS)}")
    ap.add_argument("--variants", nargs="*", default=["compiled"],
                    help="variants besides eager/reference: compiled, aot_eager, compiled_plain")
    ap.add_argument("--resume", type=Path, help="a previous result file: its configurations are kept")
    ap.add_argument("--name", default="check_chunked_loss")
    ap.add_argument("--judge", type=Path, help="re-judge a result file by the current rule (no GPU) and rewrite it")
    ap.add_argument("--train", type=int, default=0, help="also train this many steps eager and compiled (base shape)")
    args = ap.parse_args()
    if args.judge:
        record = json.loads(args.judge.read_text())
        for row in record["results"].values():
            judge(row)
        record["all_passed"] = all(r["passed"] for r in record["results"].values())
        record["tolerances"] = {"loss": LOSS_TOL, "grad": f"max({GRAD_TOL}, 2 x eager's worst vs float32)"}
        args.judge.write_text(json.dumps(record, indent=2) + "\n")
        for name, row in record["results"].items():
            print(f"{name:24s} tol {row['grad_tolerance']:.4f}", "passed" if row["passed"] else "FAILED")
        sys.exit(0 if record["all_passed"] else 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    done = json.loads(args.resume.read_text())["results"] if args.resume and args.resume.exists() else {}
    results = dict(done)
    for name in args.only or list(CONFIGS):
        if name in done:
            continue
        results[name] = check(name, CONFIGS[name], args.variants)
        path = write_result(args.name, {"env": environment(), "inductor_fix": _guarded(),
                                        "tolerances": {"loss": LOSS_TOL, "grad": f"max({GRAD_TOL}, 2 x eager's worst vs float32)"},
                                        "results": results,
                                        "all_passed": all(r["passed"] for r in results.values())})
    if args.train:
        cfg = {**BASE, **CONFIGS[(args.only or ["base"])[0]]}
        curves = {}
        for v in ("eager_flat", "compiled_flat"):
            torch._dynamo.reset()
            curves[v] = train_curve(cfg, v, args.train)
            print(v, curves[v], flush=True)
        gap = max(abs(a - b) for a, b in zip(*curves.values()))
        path = write_result(args.name + "_train", {"env": environment(), "config": cfg, "lr": 3e-4, "curves": curves,
                                                   "max_abs_gap": gap})
        print("training max gap", gap)
    ok = all(r["passed"] for r in results.values())
    print("all passed" if ok else "FAILED", "->", path if results else "(nothing run)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
