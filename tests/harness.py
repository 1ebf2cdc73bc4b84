"""The property harness: every feature registers here; properties run over combinations.

A feature is a set of keywords for the layer stack (``layers``) and/or the token wrapper
(``wrapper``), the model kinds it applies to, and a ``group``: features of one group are
alternatives (two norms, two positional schemes) and are never combined. Features register from
modules in ``tests/features/`` (one file per area), discovered by :func:`load_features`.

Properties (each a function of one built model):
  finite     forward and backward give finite values
  causal     decoders: d out[t] / d emb[s] is exactly zero for every s > t
  padding    masked padding (left or right) changes no kept output beyond the tolerance (a pooling
             funnel: right padding only, since left padding moves its pooling windows)
  backends   every backend that can compute the model agrees with the explicit one
  roundtrip  a state-dict save/load into a fresh model gives identical outputs
  cache      causal kinds, cacheable features: incremental decoding (a left-padded prefill, then
             one token at a time) gives the full forward's logits, with KVCache and StaticKVCache
"""

from __future__ import annotations

import importlib
import io
import pkgutil
import random
from dataclasses import dataclass, field

import torch

from x_transformers import Decoder, Encoder, FunnelEncoder, TransformerWrapper, XTransformer
from x_transformers.attend import BACKENDS, BackendNotSupported, attend_backend
from x_transformers.config import ConfigConflictError

KINDS = ("encoder", "decoder", "encdec")
ALL_KINDS = KINDS + ("funnel",)  # opt-in kinds: a feature names them in kinds=
FUNNEL_DEPTHS = (1, 1, 1)  # "funnel": a TransformerWrapper over FunnelEncoder, two poolings
DIM, DEPTH, HEADS, VOCAB, MAX_LEN = 32, 2, 4, 29, 64


@dataclass(frozen=True)
class Feature:
    name: str
    layers: dict = field(default_factory=dict)
    wrapper: dict = field(default_factory=dict)
    kinds: tuple = KINDS
    group: str | None = None
    cacheable: bool = True  # for the cache-agreement property
    tol: float = 1e-5

    def __hash__(self):
        return hash(self.name)


FEATURES: dict[str, Feature] = {}


def register(name: str, *, layers=None, wrapper=None, kinds=KINDS, group=None, cacheable=True, tol=1e-5) -> Feature:
    if name in FEATURES:
        raise ValueError(f"feature {name!r} registered twice")
    FEATURES[name] = f = Feature(name, dict(layers or {}), dict(wrapper or {}), tuple(kinds), group, cacheable, tol)
    return f


def load_features() -> dict[str, Feature]:
    import features as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"features.{info.name}")
    return FEATURES


# ----------------------------------------------------------------------------------------------
# building models


def merge(features) -> tuple[dict, dict]:
    layers, wrapper = {}, {}
    for f in features:
        for src, dst in ((f.layers, layers), (f.wrapper, wrapper)):
            for k, v in src.items():
                if k in dst and dst[k] != v:
                    raise ConfigConflictError(f"{k} set twice")
                dst[k] = v
    return layers, wrapper


def build(kind: str, features, seed: int = 0):
    torch.manual_seed(seed)
    layers, wrapper = merge(features)
    if kind == "encdec":
        model = XTransformer(dim=DIM, depth=DEPTH, heads=HEADS, num_tokens=VOCAB, max_seq_len=MAX_LEN, **layers, **wrapper)
    else:
        if kind == "funnel":
            stack = FunnelEncoder(dim=DIM, depths=FUNNEL_DEPTHS, heads=HEADS, **layers)
        else:
            stack = (Encoder if kind == "encoder" else Decoder)(dim=DIM, depth=DEPTH, heads=HEADS, **layers)
        model = TransformerWrapper(num_tokens=VOCAB, max_seq_len=MAX_LEN, attn_layers=stack, **wrapper)
    return model.eval()


class Runner:
    """Uniform forward for every kind. For encdec the target side is the sequence under test and
    a fixed source is the context."""

    def __init__(self, kind, model, batch=2, seed=1):
        self.kind, self.model = kind, model
        g = torch.Generator().manual_seed(seed)
        self.src = torch.randint(0, VOCAB, (batch, 7), generator=g)

    def __call__(self, x, mask=None, src=None, src_mask=None):
        if self.kind == "encdec":
            src = self.src[: x.shape[0]] if src is None else src
            return self.model(src, x, mask=src_mask, tgt_mask=mask)
        return self.model(x, mask)

    @property
    def wrapper(self):
        return self.model.decoder if self.kind == "encdec" else self.model

    @property
    def causal(self):
        return self.kind in ("decoder", "encdec")

    def output_mask(self, mask):
        """Which outputs the kept inputs give (a pooling funnel pools the mask too)."""
        layers = self.wrapper.attn_layers
        return layers.output_mask(mask) if isinstance(layers, FunnelEncoder) else mask


def tokens(batch=2, n=8, seed=0):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# properties


def check_finite(run: Runner, tol):
    run.model.train()  # dropout and layer dropout included
    out = run(tokens())
    assert torch.isfinite(out).all(), "forward produced non-finite values"
    out.float().square().mean().backward()
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]
    assert grads, "no parameter received a gradient"
    for name, p in run.model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    run.model.eval()


def check_causal(run: Runner, tol):
    if not run.causal:
        return
    captured = {}

    def hook(module, args, out):
        captured["emb"] = out

    handle = run.wrapper.token_emb.register_forward_hook(hook)
    try:
        x = tokens(batch=1, n=8)
        out = run(x)
    finally:
        handle.remove()
    emb = captured["emb"]
    n = x.shape[1]
    for t in range(n - 1):
        (grad,) = torch.autograd.grad(out[:, t].sum(), emb, retain_graph=True)
        leak = grad[:, t + 1:].abs().max().item()
        assert leak == 0.0, f"output {t} depends on a later input (max |grad| {leak:.3g})"


def check_padding(run: Runner, tol):
    x = tokens()
    ref = run(x)
    pad = tokens(2, 3, seed=5)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 8:] = False
    if run.kind == "funnel":  # both rows on the right: left padding moves the pooling windows
        xp = torch.cat((x, pad), dim=1)
        keep[1, 8:] = False
        n = ref.shape[1]  # kept inputs 0..7 give the first n outputs
        torch.testing.assert_close(run(xp, keep)[:, :n], ref, atol=tol, rtol=tol)
        return
    # row 0 padded on the right, row 1 on the left
    xp = torch.stack((torch.cat((x[0], pad[0])), torch.cat((pad[1], x[1]))))
    keep[1, :3] = False
    out = run(xp, keep)
    torch.testing.assert_close(out[0, :8], ref[0], atol=tol, rtol=tol)
    torch.testing.assert_close(out[1, 3:], ref[1], atol=tol, rtol=tol)
    if run.kind == "encdec":  # padding of the source (the cross-attention context)
        src_p = torch.cat((run.src, tokens(2, 4, seed=6)), dim=1)
        src_mask = torch.ones_like(src_p, dtype=torch.bool)
        src_mask[:, run.src.shape[1]:] = False
        torch.testing.assert_close(run(x, src=src_p, src_mask=src_mask), ref, atol=tol, rtol=tol)


def check_backends(run: Runner, tol):
    x = tokens()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 6:] = False
    with attend_backend("explicit"):
        ref, ref_m = run(x), run(x, keep)
    for name in BACKENDS:
        if name == "explicit":
            continue
        try:
            with attend_backend(name):
                out, out_m = run(x), run(x, keep)
        except BackendNotSupported:
            continue  # this backend cannot compute the configuration: dispatch never picks it
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m: f"backend {name}: {m}")
        kept = run.output_mask(keep)
        torch.testing.assert_close(out_m[kept], ref_m[kept], atol=tol, rtol=tol, msg=lambda m: f"backend {name} (masked): {m}")


def check_roundtrip(run: Runner, tol, kind=None, features=None):
    buf = io.BytesIO()
    torch.save(run.model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build(run.kind, features, seed=123)
    fresh.load_state_dict(state, strict=True)
    x = tokens()
    torch.testing.assert_close(Runner(run.kind, fresh)(x), run(x), atol=0, rtol=0)


def check_cache(run: Runner, tol, cacheable=True):
    if not run.causal or not cacheable:
        return  # encoders cannot be cached (they raise; tests/test_cache.py checks it)
    from x_transformers.cache import KVCache, StaticKVCache

    x = tokens(n=8)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :2] = False  # row 1 left-padded, as ragged prompts are
    ctx = {}
    if run.kind == "encdec":
        ctx = dict(context=run.model.encode(run.src), context_mask=None)
    net = run.wrapper
    ref = net(x, keep, **ctx)
    for make in (KVCache, lambda: StaticKVCache.for_model(net, 2, net.num_memory_tokens + 8)):
        cache = make()
        outs = [net(x[:, :3], keep[:, :3], cache=cache, **ctx)]
        outs += [net(x[:, t:t + 1], cache=cache, **ctx) for t in range(3, 8)]
        out = torch.cat(outs, dim=1)
        torch.testing.assert_close(out[keep], ref[keep], atol=max(tol, 1e-5), rtol=max(tol, 1e-5),
                                   msg=lambda m: f"{type(cache).__name__} vs full forward: {m}")


PROPERTIES = {
    "finite": check_finite,
    "causal": check_causal,
    "padding": check_padding,
    "backends": check_backends,
    "roundtrip": check_roundtrip,
    "cache": check_cache,
}


# ----------------------------------------------------------------------------------------------
# cases: every feature alone on every kind it supports, plus seeded combinations


def single_cases():
    return [(kind, (f,)) for f in FEATURES.values() for kind in f.kinds]


def combination_cases(count: int = 40, seed: int = 0, max_size: int = 3):
    rng = random.Random(seed)
    names = sorted(n for n in FEATURES if n != "plain")
    cases, seen, attempts = [], set(), 0
    while len(cases) < count and attempts < count * 50 and len(names) >= 2:
        attempts += 1
        size = rng.randint(2, min(max_size, len(names)))
        combo = tuple(sorted(rng.sample(names, size)))
        feats = tuple(FEATURES[n] for n in combo)
        groups = [f.group for f in feats if f.group]
        if len(groups) != len(set(groups)):
            continue
        kinds = [k for k in ALL_KINDS if all(k in f.kinds for f in feats)]
        if not kinds:
            continue
        kind = rng.choice(kinds)
        if (kind, combo) in seen:
            continue
        try:
            build(kind, feats)
        except ConfigConflictError:
            continue  # a combination the library refuses, with its reason, at construction
        seen.add((kind, combo))
        cases.append((kind, feats))
    return cases


def case_id(case) -> str:
    kind, feats = case
    return f"{kind}-" + "+".join(f.name for f in feats)


def run_property(prop: str, case):
    kind, feats = case
    model = build(kind, feats)
    tol = max(f.tol for f in feats)
    run = Runner(kind, model)
    if prop == "roundtrip":
        return check_roundtrip(run, tol, features=feats)
    if prop == "cache":
        return check_cache(run, tol, cacheable=all(f.cacheable for f in feats))
    return PROPERTIES[prop](run, tol)
