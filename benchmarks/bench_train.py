"""Training-step throughput: ours (eager and compiled) against PyPI x-transformers, same card, same run.

Modes (COMPILE_MODES): eager; ``compiled``, forward + loss compiled as one function (what
``xtransformers train --compile`` does); ``cudagraphs``, the same replayed as CUDA graphs
(``--compile-mode reduce-overhead``); ``autotune``; and ``model``, torch.compile of the module
alone with the loss outside, as ANCHORS.md compiled the PyPI package.

A step is forward, next-token cross-entropy (ours: ``chunked_cross_entropy`` on the hidden states
and head weight unless ``--loss plain``; PyPI: full logits), backward and a fused AdamW update, under bf16
autocast on GPU. MFU counts 6N + 12*L*d*T FLOPs per token (N without embeddings) over the bf16
matrix-product peak measured on the same card in the same run; ``mfu_with_head`` adds the output
head's 6 * vocab * dim.

    PYTHONPATH=src python benchmarks/bench_train.py                     # GPU: full shapes
    PYTHONPATH=src python benchmarks/bench_train.py --quick             # CPU: small shapes
    ... --modes eager,compiled,cudagraphs,autotune,model   # see COMPILE_MODES
    ... --features all --feature-modes eager,compiled      # feature rows against the plain model
    ... --budget-s 540   # skip rows that would not end in time (a device call has 10 minutes)
    ... --loss plain  # ours with F.cross_entropy on full float32 logits (default: fused chunked loss)
    ... --loss wrapper --modes eager,model   # the user's path, both packages: AutoregressiveWrapper(lm)(x),
                                             # eager and torch.compile(wrapper)
    ... --pypi DIR   # a folder holding PyPI x-transformers (pip install --target DIR x-transformers)

The PyPI package shares our import name, so it runs in a child process whose PYTHONPATH is only
that folder (``--impl pypi``).
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

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, matmul_peak_tflops, print_table, timed, write_result  # noqa: E402

LLAMA_KW = dict(rotary_pos_emb=True, ff_glu=True, use_rmsnorm=True, ff_no_bias=True, attn_kv_heads=4)

# name: (kind, num_tokens, dim, depth, heads, seq, batch, extra layer kwargs (ours), wrapper kwargs (ours))
SHAPES = {
    "gpt2": ("lm", 50304, 768, 12, 12, 1024, 16, {}, {}),
    "llama": ("lm", 50304, 768, 12, 12, 1024, 16, dict(LLAMA_KW, ff_activation="swish"), {}),
    "seed": ("encdec", 256, 512, 6, 8, 1024, 8, {}, {}),
}
QUICK = {"gpt2": (512, 128, 2, 4, 128, 4), "llama": (512, 128, 2, 4, 128, 4), "seed": (256, 128, 2, 4, 128, 4)}

# feature rows: gpt2 shape with one change, compared with the plain model in the same mode
FEATURES = {
    "rotary": (dict(rotary_pos_emb=True), {}),
    "alibi": (dict(alibi_pos_bias=True), {}),
    "t5_rel_pos": (dict(rel_pos_bias=True), {}),
    "kv_heads_4": (dict(attn_kv_heads=4), {}),
    "mem_kv_4": (dict(attn_num_mem_kv=4), {}),
    "memory_tokens_4": ({}, dict(num_memory_tokens=4)),
    "reversible": (dict(reversible=True), {}),
}


def shape(name, quick):
    kind, v, d, L, h, n, b, lk, wk = SHAPES[name]
    if quick:
        v, d, L, h, n, b = QUICK[name]
    return kind, v, d, L, h, n, b, lk, wk


# How a step is compiled: (scope, torch.compile mode). scope "model" compiles the module and runs
# the loss outside it (how ANCHORS.md compiled the PyPI package); "step" compiles forward + loss as
# one function (what `xtransformers train --compile` does), so the loss fuses with the last ops.
COMPILE_MODES = {
    "eager": (None, None),
    "model": ("model", "default"),
    "compiled": ("step", "default"),
    "cudagraphs": ("step", "reduce-overhead"),  # CUDA graphs replay the forward and backward
    "autotune": ("step", "max-autotune-no-cudagraphs"),  # Triton GEMM templates
}


def build(impl, name, quick, extra_layers=None, extra_wrapper=None, loss="plain", chunk_size=None):
    """Returns (model, loss_fn(batch) -> loss, batch, tokens per step, N non-embedding params, L, d, T)."""
    kind, v, d, L, h, n, b, lk, wk = shape(name, quick)
    lk, wk = {**lk, **(extra_layers or {})}, {**wk, **(extra_wrapper or {})}
    import x_transformers as xt
    if loss == "fused":
        from x_transformers.loss import chunked_cross_entropy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    if kind == "lm":
        n_pos = n + 1 if loss == "wrapper" else n  # PyPI's wrapper embeds all n + 1 tokens, then shifts
        if impl == "pypi":
            pk = {k: v_ for k, v_ in lk.items() if k != "ff_activation"}
            if lk.get("ff_activation") == "swish":
                pk["ff_swish"] = True
            model = xt.TransformerWrapper(num_tokens=v, max_seq_len=n_pos, attn_layers=xt.Decoder(
                dim=d, depth=L, heads=h, attn_flash=True, **pk), **wk)
        else:
            model = xt.TransformerWrapper(num_tokens=v, max_seq_len=n_pos, attn_layers=xt.Decoder(
                dim=d, depth=L, heads=h, **lk), **wk)
        x = torch.randint(0, v, (b, n + 1), generator=g).to(dev)
        lm = model
        if loss == "wrapper":  # the user's path: loss = AutoregressiveWrapper(lm)(x), eager or compiled whole
            model = xt.AutoregressiveWrapper(lm)

        def loss_fn(m):
            if loss == "wrapper":
                return m(x)
            if loss == "fused":
                hidden = m(x[:, :-1], return_embeddings=True)
                return chunked_cross_entropy(hidden, lm.logits_weight, x[:, 1:], chunk_size=chunk_size)
            logits = m(x[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        emb = v * d * (1 if lm.to_logits is None else 2) + (n_pos * d if getattr(lm, "pos_emb", None) is not None else 0)
    else:
        src = torch.randint(0, v, (b, n), generator=g).to(dev)
        tgt = torch.randint(0, v, (b, n + 1), generator=g).to(dev)
        if impl == "pypi":
            model = xt.XTransformer(dim=d, enc_num_tokens=v, enc_depth=L, enc_heads=h, enc_max_seq_len=n,
                                    dec_num_tokens=v, dec_depth=L, dec_heads=h, dec_max_seq_len=n + 1,
                                    enc_attn_flash=True, dec_attn_flash=True)

            def loss_fn(m):
                return m(src, tgt)  # its AutoregressiveWrapper shifts inside
        else:
            model = xt.XTransformer(dim=d, num_tokens=v, depth=L, heads=h, max_seq_len=n + 1)

            def loss_fn(m):
                if loss == "fused":
                    hidden = m(src, tgt[:, :-1], return_embeddings=True)
                    return chunked_cross_entropy(hidden, model.decoder.logits_weight, tgt[:, 1:], chunk_size=chunk_size)
                logits = m(src, tgt[:, :-1])
                return F.cross_entropy(logits.flatten(0, 1).float(), tgt[:, 1:].flatten())
        emb = 4 * v * d + 2 * (n + 1) * d
    model = model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    layers = L * (2 if kind == "encdec" else 1)
    return model, loss_fn, b * n, n_params - emb, layers, d, n


def make_step(model, loss_fn, opt, mode, dev):
    """One training step in ``mode`` (COMPILE_MODES): forward + loss under bf16 autocast (GPU),
    backward, optimizer update."""
    if mode not in COMPILE_MODES:
        raise SystemExit(f"unknown mode {mode!r}; valid: {sorted(COMPILE_MODES)}")
    scope, compile_mode = COMPILE_MODES[mode]
    amp = dict(device_type=dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    if scope in (None, "model"):
        fwd = model if scope is None else torch.compile(model, mode=compile_mode)

        def compute():
            with torch.autocast(**amp):
                return loss_fn(fwd)
    else:
        def forward_loss():
            with torch.autocast(**amp):
                return loss_fn(model)
        compute = torch.compile(forward_loss, mode=compile_mode)

    def step():
        value = compute()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(impl, name, quick, mode, peak, extra_layers=None, extra_wrapper=None, label=None, steps=10,
            loss="plain", chunk_size=None, inspect=None):
    """One row: tokens/s, MFU, peak memory, and the first step's seconds (compile time included).
    ``inspect(step, row) -> dict`` runs after timing (a profile) and its result joins the row."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model, loss_fn, tokens, n_params, L, d, T = build(impl, name, quick, extra_layers, extra_wrapper, loss, chunk_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    torch._dynamo.reset()
    step = make_step(model, loss_fn, opt, mode, dev)
    first = timed(step, warmup=0, steps=1)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compiled = COMPILE_MODES[mode][0] is not None
    sec = timed(step, warmup=2 if compiled else 1, steps=steps if dev == "cuda" else 3)
    tps = tokens / sec
    flops_per_token = 6 * n_params + 12 * L * d * T
    row = {
        "impl": impl, "shape": name, "mode": mode, "label": label or name, "loss": loss,
        "tokens_per_s": tps, "ms_per_step": sec * 1e3, "params_non_emb": n_params,
        "mfu": tps * flops_per_token / (peak * 1e12) if peak else None,
        # the same with the output head's product counted (6 * vocab * dim a token: forward and backward)
        "mfu_with_head": tps * (flops_per_token + 6 * shape(name, quick)[1] * d) / (peak * 1e12) if peak else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev == "cuda" else None, "first_step_s": first,
    }
    if inspect is not None:
        row.update(inspect(step, row))
    del model, opt, step
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def run_pypi(args, peak) -> list[dict]:
    if not args.pypi:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pypi.json"
        cmd = [sys.executable, __file__, "--impl", "pypi", "--out", str(out), "--peak", str(peak or 0),
               "--shapes", args.shapes, "--pypi-modes", args.pypi_modes, "--loss", args.loss] + (["--quick"] if args.quick else [])
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = args.pypi
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit("the PyPI x-transformers child process failed")
        return json.loads(out.read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU)")
    p.add_argument("--shapes", default="gpt2,llama,seed")
    p.add_argument("--modes", default="eager,compiled,cudagraphs", help=f"our modes, from {sorted(COMPILE_MODES)}")
    p.add_argument("--loss", default="fused", choices=["fused", "plain", "wrapper"],
                   help="our loss: chunked_cross_entropy on hidden states (fused), F.cross_entropy on logits "
                        "(plain), or the user's path, AutoregressiveWrapper(lm)(x) for both packages (wrapper; "
                        "mode 'model' is then torch.compile of the wrapper)")
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per chunk of the fused loss (default: auto)")
    p.add_argument("--pypi-modes", default="gpt2:eager,gpt2:model,gpt2:compiled,llama:eager,seed:eager",
                   help="PyPI rows as shape:mode; 'model' is torch.compile(model) as in ANCHORS.md")
    p.add_argument("--features", default="", help="comma list of feature rows (or 'all'), eager, gpt2 shape")
    p.add_argument("--feature-modes", default="eager,compiled", help="modes of the feature rows")
    p.add_argument("--tag", default="train", help="result file name stem")
    p.add_argument("--budget-s", type=float, default=None, help="skip our rows that would end past this many seconds")
    p.add_argument("--pypi", default=None, help="folder holding PyPI x-transformers")
    p.add_argument("--impl", default="ours", choices=["ours", "pypi"], help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]

    if args.impl == "pypi":  # child process
        rows = []
        for item in args.pypi_modes.split(","):
            name, mode = item.split(":")
            if name in shapes:
                # PyPI has no fused loss: its rows are the plain loss, or its own AutoregressiveWrapper
                loss = "wrapper" if args.loss == "wrapper" and SHAPES[name][0] == "lm" else "plain"
                rows.append(measure("pypi", name, args.quick, mode, args.peak or None, loss=loss))
                print(rows[-1], flush=True)
        Path(args.out).write_text(json.dumps(rows))
        return

    import x_transformers
    assert "src" in x_transformers.__file__, f"expected our package, got {x_transformers.__file__}"
    start = time.time()
    peak = matmul_peak_tflops()
    rows = run_pypi(args, peak)
    payload = {"env": environment(), "matmul_peak_tflops": peak, "quick": args.quick, "rows": rows}

    def run(name, mode, label=None, extra=(None, None)):
        """One of our rows, unless the time budget cannot hold it (then a row saying so)."""
        cost = 15 if mode == "eager" else 60
        if args.budget_s and time.time() - start + cost > args.budget_s:
            row = {"impl": "ours", "shape": name, "mode": mode, "label": label or name, "error": "skipped: time budget"}
        else:
            try:
                row = measure("ours", name, args.quick, mode, peak, *extra, label=label, loss=args.loss,
                              chunk_size=args.loss_chunk)
            except (TypeError, ValueError) as e:  # a feature not built yet is reported, not hidden
                row = {"impl": "ours", "shape": name, "mode": mode, "label": label or name, "error": str(e)}
        rows.append(row)
        print(row, flush=True)
        write_result(args.tag, payload)  # partial results survive a killed run
        return row

    for name in shapes:
        for mode in args.modes.split(","):
            run(name, mode)
    feats = list(FEATURES) if args.features == "all" else [f for f in args.features.split(",") if f]
    for fm in args.feature_modes.split(",") if feats else ():
        plain = run("gpt2", fm, label="plain")
        for f in feats:
            row = run("gpt2", fm, label=f, extra=FEATURES[f])
            if "tokens_per_s" in row and "tokens_per_s" in plain:
                row["slowdown_vs_plain"] = plain["tokens_per_s"] / row["tokens_per_s"]

    # ratios against the PyPI package, same shape
    def find(impl, name, mode):
        return next((r for r in rows if r["impl"] == impl and r["label"] == name and r.get("mode") == mode), None)
    ratios = {}
    for name in shapes:
        for ours_mode in COMPILE_MODES:
            for their_mode in COMPILE_MODES:
                a, b = find("ours", name, ours_mode), find("pypi", name, their_mode)
                if a and b:
                    ratios[f"{name}: ours {ours_mode} / pypi {their_mode}"] = a["tokens_per_s"] / b["tokens_per_s"]
    print_table(rows, ["impl", "label", "mode", "loss", "tokens_per_s", "ms_per_step", "mfu", "mfu_with_head", "peak_gib", "slowdown_vs_plain",
                       "error"])
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    payload["ratios"] = ratios
    path = write_result(args.tag, payload)
    print("wrote", path)


if __name__ == "__main__":
    main()
