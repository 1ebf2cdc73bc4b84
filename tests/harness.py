"""The property harness: every feature registers here; properties run over combinations.

A feature is a set of keywords for the layer stack (``layers``) and/or the token wrapper
(``wrapper``), the model kinds it applies to, and a ``group``: features of one group are
alternatives (two norms, two positional schemes) and are never combined. ``zero_init`` names
(substrings of parameter names) what the feature makes zero, or gradient-free, by design at
initialisation (ReZero's gate). Features register from ``tests/features/`` (one file per area).

Model kinds: decoder, encoder, cross (a CrossAttender under a TransformerWrapper, fed a fixed
context), encdec (XTransformer; the target side is the sequence under test) and funnel
(TransformerWrapper over FunnelEncoder).

Properties (each a function of one built model):
  finite     forward and backward, in training mode, give finite values
  grads      every trainable parameter gets a finite gradient, non-zero unless declared zero at
             init; after one optimizer step every one is non-zero
  causal     causal kinds: d out[t] / d emb[s] is exactly zero for every s > t
  padding    masked padding (left or right) changes no kept output beyond the tolerance (a pooling
             funnel: right padding only, since left padding moves its pooling windows); not applicable
             to a feature registered ``padding_invariant=False`` (a user's module run over every token)
  backends   every other backend that can compute the model agrees with the explicit one
  roundtrip  a state-dict save/load into a fresh model gives identical outputs
  cache      causal kinds: incremental decoding (a left-padded prefill, then one token at a time)
             gives the full forward's logits, with KVCache and StaticKVCache

The coverage rule: a property that does not apply raises :class:`NotApplicable` (counted and
printed, never a pass); a build refused by a declared conflict entry is counted as refused; a
refusal without a declared entry fails; a failure names its minimal failing feature subset.
The cases (every feature alone, the pairwise covering array) are built in harness_cases.py.
"""

from __future__ import annotations

import ast
import copy
import importlib
import io
import pkgutil
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch

from x_transformers import CrossAttender, Decoder, Encoder, FunnelEncoder, TransformerWrapper, XTransformer
from x_transformers.attend import BACKENDS, BackendNotSupported, attend_backend
from x_transformers.config import ConfigConflictError
from x_transformers.conflicts import CONFLICTS

KINDS = ("decoder", "encoder", "cross", "encdec", "funnel")
FUNNEL_DEPTHS = (1, 1, 1)  # "funnel": a TransformerWrapper over FunnelEncoder, two poolings
DIM, DEPTH, HEADS, VOCAB, MAX_LEN = 32, 2, 4, 29, 64
CONTEXT_LEN = 5  # the "cross" kind's fixed context
TABLE_KIND = {"decoder": "decoder", "encoder": "encoder", "cross": "cross", "encdec": "xtransformer",
              "funnel": "funnel"}  # harness kind -> the conflict table's kind
IMPLIED = {"decoder": dict(causal=True), "cross": dict(only_cross=True), "encdec": {}, "encoder": {}, "funnel": {}}


@dataclass(frozen=True)
class Feature:
    name: str
    layers: dict = field(default_factory=dict)
    wrapper: dict = field(default_factory=dict)
    kinds: tuple = KINDS
    group: str | None = None
    cacheable: bool = True  # for the cache-agreement property
    tol: float = 1e-5
    zero_init: tuple = ()  # parameter-name substrings with zero gradient at init, by design
    zero_grad: tuple = ()  # parameter-name substrings with zero gradient always, by design
    # False: padded tokens reach the outputs by design (a user's recurrent module runs over them)
    padding_invariant: bool = True
    # True: cache agreement is checked in float64. Two float32 computation orders (the whole sequence,
    # one token at a time) round differently, and some features turn that rounding into a visible
    # difference: a discontinuous selection (top-k keys) breaks a near-tie differently; a cancellation
    # (values projected orthogonal to a reference) magnifies it. In float64 they agree to 1e-5.
    cache_float64: bool = False

    def __hash__(self):
        return hash(self.name)


FEATURES: dict[str, Feature] = {}


def register(name: str, *, layers=None, wrapper=None, kinds=KINDS, group=None, cacheable=True, tol=1e-5,
             zero_init=(), zero_grad=(), padding_invariant=True, cache_float64=False) -> Feature:
    if name in FEATURES:
        raise ValueError(f"feature {name!r} registered twice")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"feature {name!r}: unknown kinds {sorted(unknown)}; valid: {KINDS}")
    FEATURES[name] = f = Feature(name, dict(layers or {}), dict(wrapper or {}), tuple(kinds), group, cacheable, tol,
                                 tuple(zero_init), tuple(zero_grad), padding_invariant, cache_float64)
    return f


def load_features() -> dict[str, Feature]:
    import features as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"features.{info.name}")
    return FEATURES


# ----------------------------------------------------------------------------------------------
# outcomes and counts (printed by tests/conftest.py at the end of the session)


class NotApplicable(Exception):
    """The property does not apply to this case: counted, never reported as a pass."""


class Refused(Exception):
    """The library refused the case with a declared conflict entry (``err.conflict``)."""

    def __init__(self, err):
        super().__init__(str(err))
        self.entry = err.conflict


class UndeclaredRefusal(AssertionError):
    """A ConfigConflictError that carries no declared entry: a refusal the table does not know."""


class SameKeyword(Exception):
    """Two registered features set one keyword to different values: they are alternatives."""


STATS: dict[str, Counter] = defaultdict(Counter)  # property -> outcome -> count
REFUSALS: Counter = Counter()  # declared entry's keys -> rows refused
COVERAGE: dict[str, dict] = {}  # kind -> pair-coverage numbers (filled by harness_cases.covering_rows)
FUZZ: dict = {}  # filled by tests/test_fuzz.py


# Known defects: "<property>:<kind>-<sorted features>" of a minimal failing subset -> the issue.
# A row whose failure shrinks to one of these is an expected failure (xfail, counted), and
# tests/test_properties.py asserts that each entry STILL fails: when a fix lands, that test fails
# and says to remove the entry. "build" entries are undeclared refusals (the row is avoided when
# the covering array is built, so the refusal does not cost coverage).
KNOWN_DEFECTS: dict[str, str] = {
    # (sparse normalisers with memory key/values: declared by the rule _sparse_support_only, no longer listed)
    # (encdec + ScaleNorm + QK/value RMSNorm: the encoder's final gain is scale-invariant downstream,
    # declared by the qk_rmsnorm feature)
}


# ----------------------------------------------------------------------------------------------
# building models


def merge(features) -> tuple[dict, dict]:
    layers, wrapper = {}, {}
    for f in features:
        for src, dst in ((f.layers, layers), (f.wrapper, wrapper)):
            for k, v in src.items():
                if k in dst and dst[k] != v:
                    raise SameKeyword(f"{k} set twice ({dst[k]!r}, {v!r})")
                dst[k] = v
    return layers, wrapper


def declared_refusal(kind: str, features, *, sizes: bool = True):
    """The declared conflict entry that refuses ``features`` on ``kind`` (or None): the table's
    predicates evaluated over the merged keywords, as the constructors will. ``sizes``: with the
    harness's own sizes (the funnel kind's FUNNEL_DEPTHS); without, only what the kind implies."""
    layers, wrapper = merge(features)
    own = dict(depths=FUNNEL_DEPTHS) if sizes and kind == "funnel" else {}
    settings = {**IMPLIED[kind], **own, **layers, **wrapper}
    for entry in _entries(kind):
        try:
            if entry.when(settings):
                return entry
        except Exception:  # a predicate that cannot read these settings refuses nothing here
            continue
    return None


_ENTRIES: dict = {}


def _entries(kind: str) -> list:
    """The table's entries that apply to ``kind`` (its own and the wrapper's), in table order;
    the covering array asks tens of thousands of times."""
    key = (kind, len(CONFLICTS))
    if key not in _ENTRIES:
        kinds = (TABLE_KIND[kind], "wrapper")
        _ENTRIES[key] = [e for e in CONFLICTS if any(k in e.kinds for k in kinds)]
    return _ENTRIES[key]


def applies(kind: str, features) -> bool:
    """Whether ``features`` can apply to ``kind`` at all: no declared entry refuses them together
    with only the kind's implied keywords (a CrossAttender's only_cross). The fuzz draws one
    feature or keyword at a time through this: one refused alone is not a valid value for the kind."""
    try:  # (without the harness's funnel depths: memory tokens apply to an upsampling funnel)
        return declared_refusal(kind, features, sizes=False) is None
    except SameKeyword:
        return False


def construct(kind: str, layers: dict, wrapper: dict):
    """The model of ``kind``; ``layers`` may override the sizes (dim, depth, heads: the fuzz does)."""
    layers = dict(dict(dim=DIM, depth=DEPTH, heads=HEADS), **layers)
    wrapper = dict(dict(num_tokens=VOCAB, max_seq_len=MAX_LEN), **wrapper)
    if kind == "encdec":
        return XTransformer(**layers, **wrapper)
    if kind == "funnel":
        layers.pop("depth")
        stack = FunnelEncoder(depths=FUNNEL_DEPTHS, **layers)
    else:
        stack = {"encoder": Encoder, "decoder": Decoder, "cross": CrossAttender}[kind](**layers)
    return TransformerWrapper(attn_layers=stack, **wrapper)


def build(kind: str, features, seed: int = 0):
    """The model in eval mode. Raises Refused for a declared refusal, UndeclaredRefusal for a
    ConfigConflictError the table does not declare."""
    torch.manual_seed(seed)
    layers, wrapper = merge(features)
    try:
        model = construct(kind, layers, wrapper)
    except ConfigConflictError as err:
        if getattr(err, "conflict", None) in CONFLICTS:
            raise Refused(err) from err
        raise UndeclaredRefusal(f"refused without a declared conflict entry: {err}") from err
    return model.eval()


class Runner:
    """Uniform forward for every kind. encdec: the target side is the sequence under test and a
    fixed source is the context; cross: a fixed context of CONTEXT_LEN vectors."""

    def __init__(self, kind, model, batch=2, seed=1):
        self.kind, self.model = kind, model
        g = torch.Generator().manual_seed(seed)
        self.src = torch.randint(0, VOCAB, (batch, 7), generator=g)
        dim = model.attn_layers.dim if kind == "cross" else DIM
        self.context = torch.randn(batch, CONTEXT_LEN, dim, generator=g)

    def __call__(self, x, mask=None, src=None, src_mask=None):
        b = x.shape[0]
        if self.kind == "encdec":
            src = self.src[:b] if src is None else src
            return self.model(src, x, mask=src_mask, tgt_mask=mask)
        if self.kind == "cross":
            ctx = self.context[:b] if src is None else src
            return self.model(x, mask, context=ctx, context_mask=src_mask)
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


def check_finite(run: Runner, tol, features=()):
    run.model.train()  # dropout and layer dropout included
    out = run(tokens())
    assert torch.isfinite(out).all(), "forward produced non-finite values"
    out.float().square().mean().backward()
    for name, p in run.model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    run.model.eval()


def _grads(run: Runner):
    run.model.zero_grad(set_to_none=True)
    run(tokens()).float().square().mean().backward()
    return {n: p.grad for n, p in run.model.named_parameters() if p.requires_grad}


# Sparse normalisers give keys outside a query's support exactly zero weight. With memory key/values,
# a block whose every query keeps memory keys only (top-1 / entmax over few keys) has an output that
# does not depend on its sequence's q / k / v (nor, with one key kept, on q at all): their gradients,
# and its pre-norm's, are exactly zero by the math; an encoder-decoder's encoder reaches the decoder only
# through cross-attention's keys/values, so when those blocks keep memory keys only, every encoder
# parameter is exactly zero as well (L2-distance logits with a sinusoidal table: the sequence's keys
# sit far from the small memory keys). Declared here as a rule, not listed row by row (the covering
# array's rows move whenever a feature is registered or a conflict entry is lifted).
SPARSE_NORMALISERS = {"entmax15", "entmax_alpha", "learned_entmax_alpha", "sparse_top1", "sparse_topk"}
_BLOCK_PROJECTION = re.compile(r"blocks\.\d+\.(fn\.|pre_norm\.)")


def _sparse_support_only(features, zero) -> bool:
    names = {f.name for f in features}
    # memory key/values, or the zero key/value (attn_add_zero_kv: under L2-distance scores the zero key
    # is the nearest to every query, so top-1 keeps it alone and its zero value carries no gradient)
    return bool(names & SPARSE_NORMALISERS) and any(n.startswith("mem_kv") or n == "zero_kv" for n in names) and \
        all(_BLOCK_PROJECTION.search(n) or n.startswith("encoder.") for n in zero)


def check_grads(run: Runner, tol, features=()):
    """Every trainable parameter: a finite gradient; non-zero unless a feature declares it zero at
    init (``zero_init``) or always (``zero_grad``); after one optimizer step, non-zero for all but
    the ``zero_grad`` ones. Eval mode: no layer dropped."""
    always = [pat for f in features for pat in f.zero_grad]
    at_init = always + [pat for f in features for pat in f.zero_init]
    grads = _grads(run)
    # a zero_grad parameter may have no gradient at all (the looped LM's exit gate: not in the logits' graph)
    missing = sorted(n for n, g in grads.items() if g is None and not any(pat in n for pat in always))
    assert not missing, f"parameters without a gradient: {missing}"
    grads = {n: g for n, g in grads.items() if g is not None}
    bad = sorted(n for n, g in grads.items() if not torch.isfinite(g).all())
    assert not bad, f"non-finite gradients: {bad}"
    zero = sorted(n for n, g in grads.items() if not g.any() and not any(pat in n for pat in at_init))
    if zero and _sparse_support_only(features, zero):
        raise NotApplicable(f"sparse support on memory keys only: {len(zero)} block parameters exactly zero")
    assert not zero, f"zero gradients at init, not declared zero_init: {zero}"
    # A chain of zero-initialised gates opens one link per step (an encoder-decoder under ReZero:
    # the decoder's cross-attention gates first, then the encoder's own), so allow three steps.
    opt = torch.optim.Adam([p for p in run.model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.step()
        grads = _grads(run)
        zero = sorted(n for n, g in grads.items() if (g is None or not g.any()) and not any(pat in n for pat in always))
        if not zero:
            return
    if _sparse_support_only(features, zero):
        raise NotApplicable(f"sparse support on memory keys only: {len(zero)} block parameters exactly zero")
    assert not zero, f"zero gradients after three optimizer steps: {zero}"


def check_causal(run: Runner, tol, features=()):
    if not run.causal:
        raise NotApplicable(f"{run.kind} is not causal")
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
    for t in range(x.shape[1] - 1):
        (grad,) = torch.autograd.grad(out[:, t].sum(), emb, retain_graph=True)
        leak = grad[:, t + 1:].abs().max().item()
        assert leak == 0.0, f"output {t} depends on a later input (max |grad| {leak:.3g})"


def check_padding(run: Runner, tol, features=()):
    variant = [f.name for f in features if not f.padding_invariant]
    if variant:
        raise NotApplicable(f"padded tokens reach the outputs by design: {variant}")
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
    if run.kind in ("encdec", "cross"):  # padding of the cross-attention context
        extra = tokens(2, 4, seed=6) if run.kind == "encdec" else torch.randn(2, 4, run.context.shape[-1])
        src_p = torch.cat((run.src if run.kind == "encdec" else run.context, extra), dim=1)
        src_mask = torch.ones(src_p.shape[:2], dtype=torch.bool)
        src_mask[:, -4:] = False
        torch.testing.assert_close(run(x, src=src_p, src_mask=src_mask), ref, atol=tol, rtol=tol)


def check_backends(run: Runner, tol, features=()):
    x = tokens()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 6:] = False
    with attend_backend("explicit"):
        ref, ref_m = run(x), run(x, keep)
    compared, reasons = [], []
    for name in BACKENDS:
        if name == "explicit":
            continue
        try:
            with attend_backend(name):
                out, out_m = run(x), run(x, keep)
        except BackendNotSupported as e:
            reasons.append(f"{name}: {e}")
            continue  # this backend cannot compute the configuration: dispatch never picks it
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m: f"backend {name}: {m}")
        kept = run.output_mask(keep)
        torch.testing.assert_close(out_m[kept], ref_m[kept], atol=tol, rtol=tol, msg=lambda m: f"backend {name} (masked): {m}")
        compared.append(name)
    if not compared:
        raise NotApplicable("no backend but the explicit one computes this case (" + "; ".join(reasons)[:200] + ")")


def check_roundtrip(run: Runner, tol, features=()):
    buf = io.BytesIO()
    torch.save(run.model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build(run.kind, features, seed=123)
    fresh.load_state_dict(state, strict=True)
    x = tokens()
    torch.testing.assert_close(Runner(run.kind, fresh)(x), run(x), atol=0, rtol=0)


def check_cache(run: Runner, tol, features=()):
    if not run.causal:
        raise NotApplicable(f"{run.kind} is not causal: nothing to decode incrementally")
    uncacheable = [f.name for f in features if not f.cacheable]
    if uncacheable:
        raise NotApplicable(f"not cacheable: {uncacheable}")
    from x_transformers.cache import KVCache, StaticKVCache

    if any(f.cache_float64 for f in features):  # a float64 copy (the cached model is restored per property)
        run = Runner(run.kind, copy.deepcopy(run.model).double())
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
    "grads": check_grads,
    "causal": check_causal,
    "padding": check_padding,
    "backends": check_backends,
    "roundtrip": check_roundtrip,
    "cache": check_cache,
}


def run_property(prop: str, case):
    """Run one property; raises NotApplicable, Refused, UndeclaredRefusal or the failure."""
    kind, feats = case
    if kind not in IMPLIED:
        raise ValueError(f"unknown kind {kind!r}; valid: {KINDS}")
    model = built(kind, feats)
    torch.manual_seed(0)  # dropout draws independent of which property ran before
    tol = max((f.tol for f in feats), default=1e-5)
    return PROPERTIES[prop](Runner(kind, model), tol, features=feats)


_BUILT: dict = {}  # the last case's model and its state at construction


def built(kind: str, features):
    """``build(kind, features)``, the model built once per case: the properties of one case run
    one after another, each on the model restored to its state at construction (weights, eval
    mode, no gradients), which costs a state copy instead of a construction."""
    key = (kind, tuple(f.name for f in features))
    if key in _BUILT:
        model, state = _BUILT[key]
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        return model.eval()
    model = build(kind, features)
    _BUILT.clear()
    _BUILT[key] = (model, {k: v.clone() for k, v in model.state_dict().items()})
    return model


def run_properties(props, case):
    """For tests that loop over properties: each must pass or not apply (counted)."""
    for prop in props:
        try:
            run_property(prop, case)
            STATS[prop]["checked"] += 1
        except NotApplicable:
            STATS[prop]["not applicable"] += 1


# ----------------------------------------------------------------------------------------------
# failures: shrinking, known defects


def fails(prop: str, case) -> BaseException | None:
    """The failure of ``prop`` on ``case``, or None when it passes, does not apply or is refused.
    ``prop`` "build": an undeclared refusal at construction."""
    try:
        if prop == "build":
            build(*case)
            return None
        run_property(prop, case)
    except (NotApplicable, Refused, SameKeyword):
        return None
    except Exception as e:  # noqa: BLE001 - any other exception is a failure of the property
        return e
    return None


def defect_key(prop: str, case) -> str:
    kind, feats = case
    return f"{prop}:{kind}-" + ("+".join(sorted(f.name for f in feats)) or "(none)")


def shrink(prop: str, case):
    """Greedy delta: drop features one at a time while the property still fails."""
    kind, feats = case
    if fails(prop, (kind, ())) is not None:  # the kind itself fails: nothing to attribute
        return kind, ()
    feats = list(feats)
    changed = True
    while changed:
        changed = False
        for f in list(feats):
            trial = [g for g in feats if g is not f]
            if fails(prop, (kind, tuple(trial))) is not None:
                feats, changed = trial, True
    return kind, tuple(feats)


def check_case(prop: str, case):
    """The suite's view of one (property, case): pass, counted skip, xfail for a known defect, or
    a failure naming the minimal failing subset."""
    import pytest

    try:
        run_property(prop, case)
    except NotApplicable as e:
        STATS[prop]["not applicable"] += 1
        pytest.skip(f"not applicable: {e}")
    except Refused as e:
        STATS[prop]["refused (declared)"] += 1
        REFUSALS[" + ".join(e.entry.keys)] += 1
        pytest.skip(f"refused by the declared entry {e.entry.keys}: {e}")
    except Exception as e:  # noqa: BLE001
        which = "build" if isinstance(e, UndeclaredRefusal) else prop
        minimal = shrink(which, case)
        key = known_defect(defect_key(which, minimal)) or defect_key(which, minimal)
        if key in KNOWN_DEFECTS:
            STATS[prop]["known defect"] += 1
            pytest.xfail(f"known defect {key}: {KNOWN_DEFECTS[key]}")
        STATS[prop]["failed"] += 1
        raise AssertionError(f"{prop} fails on {case_id(case)}; minimal failing subset: {key}\n"
                             f"{type(e).__name__}: {e}") from e
    STATS[prop]["checked"] += 1


WRAPPER_KEYWORDS = ("emb_dim", "emb_dropout", "num_memory_tokens", "logits_scale", "tie_embedding")
_KEYWORD_FEATURES: dict[str, Feature] = {}


def keyword_feature(key: str, value) -> Feature:
    """A one-keyword pseudo-feature named "key=value" (the fuzz's numeric keywords), so shrinking
    drops keywords the way it drops features, and a defect key can name them."""
    name = f"{key}={value!r}"
    if name not in _KEYWORD_FEATURES:
        where = "wrapper" if key in WRAPPER_KEYWORDS else "layers"
        _KEYWORD_FEATURES[name] = Feature(name, **{where: {key: value}})
    return _KEYWORD_FEATURES[name]


def _feature(name: str) -> Feature:
    if name in FEATURES:
        return FEATURES[name]
    key, value = name.split("=", 1)
    return keyword_feature(key, ast.literal_eval(value))


def parse_defect_key(key: str):
    prop, rest = key.split(":", 1)
    kind, names = rest.split("-", 1)
    feats = () if names == "(none)" else tuple(_feature(n) for n in names.split("+"))
    return prop, (kind, feats)


def known_defect(key: str) -> str | None:
    """The KNOWN_DEFECTS entry a minimal failing subset matches: the same key, or the same
    features and keywords with other keyword values (the fuzz draws values at random)."""
    if key in KNOWN_DEFECTS:
        return key

    def shape(k):  # sizes (dim, depth, heads) a value needs, as top_attn_to_ff=3 needs depth=3, do not count
        prop, rest = k.split(":", 1)
        kind, names = rest.split("-", 1)
        keys = (n.split("=", 1)[0] for n in names.split("+"))
        return prop, kind, tuple(sorted(n for n in keys if n not in ("dim", "depth", "heads")))

    prop, kind, names = shape(key)
    return next((k for k in KNOWN_DEFECTS if shape(k) in ((prop, kind, names), (prop, "*", names))), None)


def case_id(case) -> str:
    kind, feats = case
    return f"{kind}-" + ("+".join(f.name for f in feats) or "(none)")
