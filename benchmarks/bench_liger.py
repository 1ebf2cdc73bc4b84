"""liger-kernel's fused Triton kernels against what inductor generates for ours (issue 22, item 3:
"try liger-kernel's fused kernels ... against inductor, and keep whichever is faster, measured").

Forward + backward of each op at the Llama-style GPT-2-small shape (16 x 1024 tokens, dim 768, 12
heads of 64, 4 KV heads, SwiGLU hidden 3072, vocab 50304), bf16, one CUDA event timing per row:

- RMSNorm: ours (``F.rms_norm``) eager and compiled, ``liger_rms_norm``;
- SwiGLU gate: ``F.silu(a) * b`` compiled, ``liger_swiglu``;
- rotary on q and k: our ``apply_rotary`` compiled, ``liger_rope``;
- next-token loss from the hidden states: our ``chunked_cross_entropy`` eager and compiled,
  compiled ``F.cross_entropy`` over the full logits, ``liger_fused_linear_cross_entropy``;
- the whole training step of the Llama-style model: the compiled ``AutoregressiveWrapper`` (our fused
  loss inside the graph) against the compiled stack with liger's fused linear cross-entropy after it.

    PYTHONPATH=src python benchmarks/bench_liger.py [--json PATH]

Needs a CUDA GPU and liger-kernel (``pip install liger-kernel``; offline: its wheel, no deps).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess

import torch
import torch.nn.functional as F

B, T, D, H, KV, DH, HID, V = 16, 1024, 768, 12, 4, 64, 3072, 50304


def timed(fn, *args, iters: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of fn(*args) (forward and backward) over iters calls."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fwd_bwd(op):
    """A step that runs op on fresh-grad leaves and back-propagates the sum of its outputs."""
    def step(*leaves):
        out = op(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.float().sum() if o.dim() else o for o in outs])
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.grad is not None:
                leaf.grad = None
    return step


def leaf(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=dtype) * scale).requires_grad_()


def op_rows() -> list[dict]:
    from liger_kernel.transformers.functional import (liger_fused_linear_cross_entropy, liger_rms_norm, liger_rope,
                                                      liger_swiglu)

    from x_transformers.loss import chunked_cross_entropy
    from x_transformers.positional import apply_rotary

    rows = []

    def row(op, variant, ms, ref=None):
        rows.append(dict(op=op, variant=variant, ms=round(ms, 4)))
        print(f"{op:10s} {variant:34s} {ms:8.3f} ms", flush=True)

    x, w = leaf(B * T, D), leaf(D)
    ours = lambda x, w: F.rms_norm(x, (D,), w, 1e-5)
    row("rmsnorm", "ours eager", timed(fwd_bwd(ours), x, w))
    row("rmsnorm", "ours compiled (inductor)", timed(fwd_bwd(torch.compile(ours)), x, w))
    # liger normalises in place by default; a copy keeps the leaf intact for the next call
    row("rmsnorm", "liger", timed(fwd_bwd(lambda x, w: liger_rms_norm(x * 1, w, 1e-5, in_place=False)), x, w))

    a, b = leaf(B * T, HID), leaf(B * T, HID)
    glu = lambda a, b: F.silu(a) * b
    row("swiglu", "ours eager", timed(fwd_bwd(glu), a, b))
    row("swiglu", "ours compiled (inductor)", timed(fwd_bwd(torch.compile(glu)), a, b))
    row("swiglu", "liger", timed(fwd_bwd(liger_swiglu), a, b))

    q, k = leaf(B, H, T, DH), leaf(B, KV, T, DH)
    angles = torch.arange(T, device="cuda")[:, None].float() * (1e4 ** (-torch.arange(0, DH, 2, device="cuda") / DH))
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (T, DH), half-split layout
    rot = lambda q, k: (apply_rotary(q, cos[None, None], sin[None, None]), apply_rotary(k, cos[None, None], sin[None, None]))
    row("rotary", "ours eager", timed(fwd_bwd(rot), q, k))
    row("rotary", "ours compiled (inductor)", timed(fwd_bwd(torch.compile(rot)), q, k))
    # liger rotates its inputs in place: copies keep the leaves intact
    row("rotary", "liger", timed(fwd_bwd(lambda q, k: liger_rope(q * 1, k * 1, cos[None].bfloat16(), sin[None].bfloat16())),
                                 q, k))

    h, wv = leaf(B * T, D), leaf(V, D, scale=D ** -0.5)
    tgt = torch.randint(0, V, (B * T,), device="cuda")
    ce_full = lambda h, wv: F.cross_entropy((h @ wv.T).float(), tgt)
    row("loss", "ours chunked eager", timed(fwd_bwd(lambda h, wv: chunked_cross_entropy(h, wv, tgt)), h, wv))
    row("loss", "ours chunked compiled", timed(fwd_bwd(torch.compile(lambda h, wv: chunked_cross_entropy(h, wv, tgt))), h, wv))
    row("loss", "full logits + F.cross_entropy compiled", timed(fwd_bwd(torch.compile(ce_full)), h, wv))
    row("loss", "liger fused linear cross-entropy", timed(fwd_bwd(lambda h, wv: liger_fused_linear_cross_entropy(h, wv, tgt)),
                                                          h, wv))
    return rows


def step_rows() -> list[dict]:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    torch.manual_seed(0)
    lm = TransformerWrapper(num_tokens=V, max_seq_len=T, attn_layers=Decoder(
        dim=D, depth=12, heads=H, attn_kv_heads=KV, rotary_pos_emb=True, ff_glu=True, ff_activation="swish",
        use_rmsnorm=True, ff_no_bias=True)).cuda()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, V, (B, T + 1), device="cuda")
    wrapper = torch.compile(AutoregressiveWrapper(lm))
    stack = torch.compile(lambda inp: lm(inp, return_embeddings=True))

    def ours():
        with torch.autocast("cuda", torch.bfloat16):
            loss = wrapper(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def liger():
        with torch.autocast("cuda", torch.bfloat16):
            h = stack(x[:, :-1])
            loss = liger_fused_linear_cross_entropy(h.flatten(0, 1), lm.logits_weight.to(h.dtype), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    for name, fn in (("ours: compiled AutoregressiveWrapper", ours), ("compiled stack + liger fused linear CE", liger)):
        ms = timed(lambda: fn(), iters=10, warmup=3)
        rows.append(dict(op="train step (llama-style)", variant=name, ms=round(ms, 3),
                         tokens_per_s=round(B * T / ms * 1e3, 1)))
        print(f"step       {name:34s} {ms:8.3f} ms  {B * T / ms * 1e3:,.0f} tok/s", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="where the JSON goes (default $OUT/liger.json, else benchmarks/results/)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_liger needs a CUDA GPU: liger-kernel's kernels are Triton kernels")
    import liger_kernel  # noqa: F401  (a clear ImportError before any work)

    rows = op_rows() + step_rows()
    best = {}
    for r in rows:
        if r["op"] not in best or r["ms"] < best[r["op"]]["ms"]:
            best[r["op"]] = r
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    out = dict(benchmark="liger-kernel vs inductor, forward + backward, bf16", card=torch.cuda.get_device_name(),
               torch=torch.__version__, liger_kernel=importlib.metadata.version("liger-kernel"),
               python=platform.python_version(), commit=os.environ.get("XT_COMMIT", commit),
               shape=dict(batch=B, seq=T, dim=D, heads=H, kv_heads=KV, dim_head=DH, ff_hidden=HID, vocab=V),
               rows=rows, fastest={op: r["variant"] for op, r in best.items()})
    path = a.json or os.path.join(os.environ.get("OUT", "benchmarks/results"), "liger.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("fastest:", out["fastest"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
