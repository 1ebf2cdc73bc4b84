"""The fuzz: random combinations of the registered features and random values of the documented
numeric keywords (within their valid ranges; tiny sizes), on every model kind.

Each configuration either builds and passes, or is refused by a declared conflict entry. Checked:
forward and backward finite (training mode); causal kinds: incremental decoding gives the full
forward's fp32 logits within 1e-5 (KVCache and StaticKVCache), and greedy generation with the cache
equals greedy generation without it (XTransformer through its own ``generate``). A failure is shrunk
to its minimal failing subset of features and keywords.

The default suite runs a fixed, seeded few hundred configurations; ``make fuzz`` runs FUZZ_COUNT.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import pytest
import torch

import harness
from harness import (FEATURES, KINDS, NotApplicable, Refused, Runner, SameKeyword, build, check_cache, check_finite,
                     defect_key, known_defect, load_features)
from x_transformers import AutoregressiveWrapper
from x_transformers.feedforward import ACTIVATIONS

load_features()
CI_COUNT, CI_SEED = 300, 0


def _even(rng, lo, hi):
    return 2 * rng.randint(lo // 2, hi // 2)


# A numeric keyword that fills the same slot as a feature's keyword is its alternative, as two
# features of one group are (harness.py): never drawn with it
ALTERNATIVES = {
    "ff_activation": ("ff_solu", "ff_custom_activation"),  # the one activation of the feed-forward
    "sandwich_coef": ("par_ratio", "custom_layers"),  # the layer order
    "attn_kv_heads": ("attn_shared_qk",),  # the keys: the queries themselves, or grouped heads
}


def _dim_head_fits(d: int, heads: int, chosen: dict) -> bool:
    """Whether head width d leaves the features chosen their sizes: NTK rescaling rotates at least
    4 channels (half of d by default), a low-rank gate's rank is below heads * d."""
    if chosen.get("rotary_base_rescale_factor", 1.0) != 1.0 and not chosen.get("rotary_emb_dim") and d < 8:
        return False
    ranks = [v for k, v in chosen.items() if k.endswith("_rank") and v]
    return all(heads * d > r for r in ranks)


def numeric_keywords(rng: random.Random, kind: str, chosen: dict) -> dict:
    """Random values for documented keywords, each valid given the sizes and the features chosen,
    and only keywords that can apply to the kind (harness.applies) and are no alternative of a
    chosen feature (ALTERNATIVES). Keywords the features already set keep the features' values."""
    # heads: a multiple of every head count the features fix (kv heads, ALiBi heads)
    fixed = [chosen[k] for k in ("attn_kv_heads", "alibi_num_heads") if chosen.get(k)]
    heads = rng.choice([h for h in (1, 2, 4) if all(h % f == 0 for f in fixed if f != 0) and h >= max(fixed, default=1)])
    dim = rng.choice((16, 32))
    # a feature that fixes the sizes keeps them (a user's module built for them: the hybrid GRU)
    heads, dim = chosen.get("heads", heads), chosen.get("dim", dim)
    kw = {k: v for k, v in dict(heads=heads, dim=dim).items() if k not in chosen}
    if kind != "funnel":
        kw["depth"] = rng.randint(1, 3)
    depth = kw.get("depth", 1)
    fits = [d for d in (4, 8, 12) if _dim_head_fits(d, heads, chosen)]
    dim_head = rng.choice(fits) if rng.random() < 0.3 and "attn_dim_head" not in chosen else None
    if dim_head:
        kw["attn_dim_head"] = dim_head
    dim_head = chosen.get("attn_dim_head") or dim_head or dim // heads
    if chosen.get("rotary_emb_dim", 0) > dim_head:  # a partial rotary feature needs its channels
        kw["attn_dim_head"] = dim_head = 8
    draws = {
        "attn_kv_heads": lambda: rng.choice([d for d in range(1, heads + 1) if heads % d == 0]),
        "attn_num_mem_kv": lambda: rng.randint(1, 3),
        "attn_dropout": lambda: round(rng.uniform(0, 0.3), 2),
        "ff_dropout": lambda: round(rng.uniform(0, 0.3), 2),
        "layer_dropout": lambda: round(rng.uniform(0, 0.3), 2),
        "emb_dropout": lambda: round(rng.uniform(0, 0.3), 2),
        "attn_sparse_topk": lambda: rng.randint(1, 6),
        "attn_scale": lambda: round(rng.uniform(0.05, 0.5), 3),
        "ff_mult": lambda: rng.choice((1, 2, 4)),
        "ff_inner_dim": lambda: rng.randint(8, 48),
        "ff_chunks": lambda: rng.randint(1, 4),
        "ff_activation": lambda: rng.choice(sorted(ACTIVATIONS)),
        "norm_eps": lambda: rng.choice((1e-6, 1e-5, 1e-3)),
        "num_memory_tokens": lambda: rng.randint(1, 3),
        "emb_dim": lambda: rng.choice((16, 24, dim)),
        "logits_scale": lambda: round(rng.uniform(0.2, 2.0), 2),
    }
    if kind != "funnel" and not chosen.get("enc_funnel"):  # a funnel's blocks have depths of their own
        draws["sandwich_coef"] = lambda: rng.randint(1, depth)
        # at most the self-attention blocks there are (a custom layout may have fewer than depth)
        attn_blocks = list(chosen["custom_layers"]).count("a") if chosen.get("custom_layers") else depth
        if attn_blocks:
            draws["top_attn_to_ff"] = lambda: rng.randint(1, min(depth, attn_blocks))
    # keywords that refine a feature: drawn only when the feature is on
    if chosen.get("rotary_pos_emb"):  # (NTK rescaling needs 4 rotated channels)
        draws["rotary_emb_dim"] = lambda: _even(rng, 4 if chosen.get("rotary_base_rescale_factor", 1.0) != 1.0 else 2,
                                                dim_head)
        draws["rotary_base"] = lambda: float(rng.choice((100, 10000, 500000)))
    if chosen.get("rel_pos_bias"):  # max_distance past the exact offsets (buckets // 2, or // 4 both ways)
        draws["rel_pos_num_buckets"] = lambda: rng.randint(4, 32)
        draws["rel_pos_max_distance"] = lambda: rng.randint(40, 128)
    if chosen.get("alibi_pos_bias"):
        draws["alibi_num_heads"] = lambda: rng.randint(1, heads)
    if chosen.get("attn_qk_norm"):  # (the scale QK-norm's logits start at; refused without it)
        draws["attn_qk_norm_scale"] = lambda: round(rng.uniform(1, 20), 1)
    if chosen.get("attn_entmax_alpha") is not None:
        draws["attn_entmax_alpha"] = lambda: round(rng.uniform(1.1, 2.0), 2)
    if chosen.get("tupe"):
        draws["tupe_max_seq_len"] = lambda: rng.randint(16, 64)
    names = [n for n in sorted(draws) if n not in chosen and harness.applies(kind, (keyword_feature(n, 1),))
             and not any(chosen.get(k) for k in ALTERNATIVES.get(n, ()))]
    for name in rng.sample(names, rng.randint(0, min(4, len(names)))):
        kw[name] = draws[name]()
    return kw


def draw(rng: random.Random):
    """One configuration: (kind, features), the numeric keywords as one-keyword pseudo-features
    (so shrinking can drop them one at a time)."""
    kind = rng.choice(KINDS + ("decoder", "decoder"))
    # valid values only: a feature or keyword that a declared entry refuses on this kind by itself
    # (rotary on a CrossAttender: no self-attention to act on) can never apply to it
    pool = sorted((f for f in FEATURES.values() if kind in f.kinds and f.name != "plain" and harness.applies(kind, (f,))),
                  key=lambda f: f.name)
    feats, groups = [], set()
    for f in rng.sample(pool, rng.randint(0, min(5, len(pool)))):
        if f.group and f.group in groups:
            continue
        try:
            harness.merge(feats + [f])
        except SameKeyword:
            continue
        feats.append(f)
        groups.add(f.group)
    chosen = {}
    for f in feats:
        chosen.update(f.layers)
        chosen.update(f.wrapper)
    for key, value in numeric_keywords(rng, kind, chosen).items():
        feats.append(keyword_feature(key, value))
    return kind, tuple(feats)


keyword_feature = harness.keyword_feature


# ----------------------------------------------------------------------------------------------
# the fuzz properties


def check_generation(run: Runner, tol, features=()):
    """Greedy generation with the cache equals greedy generation without it."""
    if not run.causal:
        raise NotApplicable("not causal")
    uncacheable = [f.name for f in features if not f.cacheable]
    if uncacheable:
        raise NotApplicable(f"not cacheable: {uncacheable}")
    prompt = harness.tokens(2, 4, seed=3)
    if run.kind == "encdec":
        gen = lambda cache: run.model.generate(run.src, prompt, 5, temperature=0.0, cache_kv=cache)  # noqa: E731
    else:
        ar = AutoregressiveWrapper(run.model)
        # a looped net at a fixed number of loop steps (its early exit stops each cached token at its own step,
        # which a rerun of the whole sequence does not: that is the paper's approximation, not a cache's)
        fixed = dict(looped_steps=run.model.cfg.max_looped_steps) if run.model.looped else {}
        gen = lambda cache: ar.generate(prompt, 5, temperature=0.0, cache_kv=cache, **fixed)  # noqa: E731
    with_cache, without = gen(True), gen(False)
    assert torch.equal(with_cache, without), f"cached {with_cache.tolist()} != uncached {without.tolist()}"


FUZZ_PROPERTIES = {"finite": check_finite, "cache": check_cache, "generate": check_generation}


def run_fuzz_property(prop, case):
    kind, feats = case
    model = build(kind, feats)
    tol = max((f.tol for f in feats), default=1e-5)
    return FUZZ_PROPERTIES[prop](Runner(kind, model), tol, features=feats)


def failure(prop, case, like=None):
    try:
        run_fuzz_property(prop, case)
    except (NotApplicable, Refused, SameKeyword):
        return None
    except Exception as e:  # noqa: BLE001
        return e if like is None or type(e) is type(like) else None
    return None


def shrink(prop, case, err):
    """Greedy delta over features and keywords, keeping the same kind of failure."""
    kind, feats = case
    feats, changed = list(feats), True
    while changed:
        changed = False
        for f in list(feats):
            trial = tuple(g for g in feats if g is not f)
            if failure(prop, (kind, trial), like=err) is not None:
                feats, changed = list(trial), True
    return kind, tuple(feats)


def fuzz(count: int, seed: int, shard: tuple[int, int] = (0, 1)) -> dict:
    """``count`` seeded configurations; with ``shard=(k, n)`` only those whose index is k mod n (the
    same draws: n processes with k = 0..n-1 together run the whole fuzz, their counts summing to it)."""
    rng = random.Random(seed)
    stats = dict(count=count, seed=seed, shard=shard, passed=0, refused=0, known=0, failed=[], by_entry=Counter(),
                 known_keys=Counter())
    start = time.perf_counter()
    for i in range(count):
        case = draw(rng)
        if i % shard[1] != shard[0]:
            continue
        torch.manual_seed(i)
        try:
            for prop in FUZZ_PROPERTIES:
                err = None
                try:
                    run_fuzz_property(prop, case)
                except NotApplicable:
                    continue
                except Refused:
                    raise
                except Exception as e:  # noqa: BLE001
                    err = e
                if err is not None:
                    which = "build" if isinstance(err, harness.UndeclaredRefusal) else prop
                    minimal = shrink(prop, case, err)
                    key = defect_key(which, minimal)
                    known = known_defect(key)
                    if known:
                        stats["known"] += 1
                        stats["known_keys"][known] += 1
                    else:
                        stats["failed"].append(f"{key} (config #{i}: {harness.case_id(case)}): "
                                               f"{type(err).__name__}: {str(err)[:300]}")
                    break
            else:
                stats["passed"] += 1
        except Refused as e:
            stats["refused"] += 1
            stats["by_entry"][" + ".join(e.entry.keys)] += 1
    stats["seconds"] = round(time.perf_counter() - start, 1)
    harness.FUZZ = stats
    return stats


def _report(stats):
    harness.FUZZ.update(stats)
    failed = stats["failed"]
    assert not failed, f"{len(failed)} fuzz configurations failed:\n" + "\n".join(failed[:20])


def test_fuzz_fixed_configurations():
    """The CI slice: CI_COUNT seeded configurations, the same on every run."""
    _report(fuzz(CI_COUNT, CI_SEED))


@pytest.mark.fuzz
def test_fuzz_large():
    count = int(os.environ.get("FUZZ_COUNT", "10000"))
    seed = int(os.environ.get("FUZZ_SEED", "1"))
    k, n = (int(v) for v in os.environ.get("FUZZ_SHARD", "0/1").split("/"))  # "k/n": every n-th from the k-th
    _report(fuzz(count, seed, shard=(k, n)))


def test_draws_are_deterministic():
    a = [harness.case_id(draw(random.Random(5))) for _ in range(3)]
    b = [harness.case_id(draw(random.Random(5))) for _ in range(3)]
    assert a == b
