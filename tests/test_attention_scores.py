"""The attention features that change how scores become weights (entmax, top-k), which backend
each configuration gets, which combinations are refused, and every attention feature with every
positional scheme through the property harness (split from test_attention.py)."""

import importlib

import pytest
import torch

from x_transformers import BackendNotSupported, ConfigConflictError, Decoder, attend, attend_backend

from harness import (FEATURES, Refused, UndeclaredRefusal, build, defect_key, known_defect, load_features,
                     run_properties)
from attention_helpers import D, DIM, HEADS, attention, copy_weights, inputs, key_mask, plain_logits, sharpen, weights

attend_mod = importlib.import_module("x_transformers.attend")  # the package exports the function under that name


# ----------------------------------------------------------------------------------------------
# adaptively sparse attention (entmax), 1909.00015


def test_entmax15_rows_sum_to_one_with_exact_zeros():
    import entmax

    a = attention(attn_use_entmax15=True)
    sharpen(a)
    x = inputs()
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, 6:] = False
    w = weights(a, x, mask=key_mask(keep))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, HEADS, 8))
    assert (w == 0).any(-1).all(), "every row has exact zeros"
    assert ((w > 0).sum(-1) > 1).any(), "and is not simply one-hot"
    assert (w[0, ..., 6:] == 0).all(), "masked keys get no weight"
    # the weights are the package's entmax15 of the scores
    torch.testing.assert_close(w[1], entmax.entmax15(plain_logits(a, x)[1], dim=-1))


def test_entmax_alpha_towards_one_approaches_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, 8, D, generator=g) * 2 for _ in range(3))
    ref = attend(q, k, v)[0]
    errors = [(attend(q, k, v, normalizer="entmax_bisect", entmax_alpha=alpha)[0] - ref).abs().max().item()
              for alpha in (2.0, 1.5, 1.1, 1.01, 1.001)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2, errors
    # through the keyword: alpha 1.001 is nearly the plain block, alpha 1.5 is not
    plain, x = attention(), inputs()
    sharpen(plain)
    for alpha, close in ((1.001, True), (1.5, False)):
        a = attention(attn_entmax_alpha=alpha)
        copy_weights(a, plain)
        assert torch.allclose(a(x)[0], plain(x)[0], atol=1e-3) == close


def test_learned_entmax_alpha_per_head_gets_gradients_and_stays_in_range():
    a = attention(attn_learned_entmax_alpha=True)
    fixed = attention(attn_entmax_alpha=1.5)
    fixed.load_state_dict({k: v for k, v in a.state_dict().items() if k != "entmax_alpha_logit"})
    sharpen(a, fixed, factor=10.0)
    x = inputs()
    alpha = a.entmax_alpha.flatten()
    torch.testing.assert_close(alpha.detach(), torch.full((HEADS,), 1.5))  # init: entmax15
    torch.testing.assert_close(a(x)[0], fixed(x)[0], atol=1e-5, rtol=1e-4)
    a(x)[0].square().sum().backward()
    grad = a.entmax_alpha_logit.grad
    assert torch.isfinite(grad).all() and (grad != 0).all(), "every head's alpha learns"
    with torch.no_grad():  # however far training pushes it, alpha stays in (1, 2]
        a.entmax_alpha_logit.copy_(torch.tensor([-1e4, -30.0, 30.0, 1e4]))
    alpha = a.entmax_alpha.flatten()
    assert (alpha > 1).all() and (alpha <= 2).all(), alpha
    w = weights(a, x)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, HEADS, 8))
    assert not torch.allclose(w[:, 0], torch.full_like(w[:, 0], 1 / 8), atol=1e-3), "alpha near 1 is softmax, not uniform"


# ----------------------------------------------------------------------------------------------
# explicit sparse attention (top-k), 1912.11637


def test_sparse_topk_keeps_exactly_the_k_largest_renormalised():
    k = 3
    plain, topk = attention(), attention(attn_sparse_topk=k)
    copy_weights(topk, plain)
    sharpen(plain, topk)
    x = inputs()
    w, ref = weights(topk, x), weights(plain, x)
    assert ((w > 0).sum(-1) == k).all()
    top = ref.topk(k, dim=-1).indices
    support = torch.zeros_like(ref, dtype=torch.bool).scatter(-1, top, True)
    assert torch.equal(w > 0, support)
    torch.testing.assert_close(w, ref * support / (ref * support).sum(-1, keepdim=True))


@pytest.mark.parametrize("normalizer", [dict(attn_use_entmax15=True), dict(attn_entmax_alpha=1.3),
                                        dict(attn_learned_entmax_alpha=True)])
def test_sparse_topk_with_entmax_keeps_the_k_largest_then_entmax(normalizer):
    """As upstream's Attend: top-k picks the candidate keys, then entmax normalises over them; the
    weights sum to one, only top-k keys get weight, and they are entmax of the top-k scores."""
    import entmax

    k = 3
    a = attention(attn_sparse_topk=k, **normalizer)
    sharpen(a, factor=3.0)
    x = inputs()
    w = weights(a, x)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, HEADS, 8))
    logits = plain_logits(a, x)
    top = logits.topk(k, dim=-1).indices
    support = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, top, True)
    assert not (w[~support]).any(), "only top-k keys get weight"
    if "attn_use_entmax15" in normalizer:
        expected = entmax.entmax15(logits.masked_fill(~support, torch.finfo(logits.dtype).min / 2), dim=-1)
        torch.testing.assert_close(w, expected)
    w.sum().backward() if w.requires_grad else None


def test_sparse_topk_never_counts_masked_keys():
    k = 3
    a = attention(attn_sparse_topk=k)
    sharpen(a)
    x = inputs()
    x[:, 5:] *= 50  # the masked keys would have the largest logits
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[:, 5:] = False
    keep[1, :3] = False  # row 1: only keys 3 and 4 are visible, fewer than k
    w = weights(a, x, mask=key_mask(keep))[..., :5, :]  # the kept queries
    assert (w[0][..., ~keep[0]] == 0).all() and (w[1][..., ~keep[1]] == 0).all()
    assert ((w[0] > 0).sum(-1) == k).all() and ((w[1] > 0).sum(-1) == 2).all()
    # causal: query i sees i + 1 keys, so attends to min(k, i + 1)
    dec = attention(causal=True, attn_sparse_topk=k)
    sharpen(dec)
    counts = (weights(dec, inputs()) > 0).sum(-1)
    assert torch.equal(counts, torch.arange(1, 9).clamp(max=k).expand_as(counts))


# ----------------------------------------------------------------------------------------------
# backend dispatch: score-needing features go explicit, the others keep the fused kernel

BACKEND_CASES = [
    ({}, "sdpa"),
    ({"attn_num_mem_kv": 2}, "sdpa"),
    ({"attn_dim_head": 12}, "sdpa"),
    ({"attn_shared_qk": True}, "sdpa"),
    ({"attn_kv_heads": 2}, "sdpa"),
    ({"attn_kv_heads": 1}, "sdpa"),
    ({"attn_qk_norm": True}, "sdpa"),
    ({"attn_talking_heads": True}, "explicit"),
    ({"attn_pre_talking_heads": True}, "explicit"),
    ({"attn_post_talking_heads": True}, "explicit"),
    ({"attn_use_entmax15": True}, "explicit"),
    ({"attn_entmax_alpha": 1.3}, "explicit"),
    ({"attn_learned_entmax_alpha": True}, "explicit"),
    ({"attn_sparse_topk": 3}, "explicit"),
]


@pytest.mark.parametrize("kw, expected", BACKEND_CASES, ids=lambda v: str(v))
def test_backend_each_configuration_gets(kw, expected, monkeypatch):
    chosen = []
    original = attend_mod.choose_backend

    def spy(req, force=None):
        backend = original(req, force)
        chosen.append((backend.name, attend_mod.rejection_reasons(req)))
        return backend

    monkeypatch.setattr(attend_mod, "choose_backend", spy)
    for causal in (False, True):
        a = attention(causal, **kw)
        assert a.cfg.needs_scores == (expected == "explicit")
        a(inputs())
    assert [name for name, _ in chosen] == [expected] * 2
    for _, reasons in chosen:
        assert reasons["explicit"] == []
        assert bool(reasons["sdpa"]) == (expected == "explicit")


@pytest.mark.parametrize("kw, reason", [("attn_talking_heads", "talking heads"),
                                        ("attn_use_entmax15", "not softmax"),
                                        ("attn_sparse_topk", "top-k")])
def test_forcing_sdpa_on_a_score_feature_raises_with_the_reasons(kw, reason):
    # forced by keyword: refused at construction (conflicts.py); forced at call time: the reasons
    with pytest.raises(ConfigConflictError, match=f"attn_backend cannot be combined with {kw}"):
        attention(**{kw: 3 if kw == "attn_sparse_topk" else True}, attn_backend="sdpa")
    q = k = v = torch.randn(1, HEADS, 4, D)
    with pytest.raises(BackendNotSupported, match="talking heads"):
        attend(q, k, v, force_backend="sdpa", pre_mix=torch.eye(HEADS))
    with pytest.raises(BackendNotSupported, match=reason), attend_backend("sdpa"):
        attention(**{kw: 3 if kw == "attn_sparse_topk" else True})(inputs())


# ----------------------------------------------------------------------------------------------
# combinations refused at construction, naming both keywords

REFUSED = [
    (dict(attn_use_entmax15=True, attn_entmax_alpha=1.3), ("attn_use_entmax15", "attn_entmax_alpha")),
    (dict(attn_use_entmax15=True, attn_learned_entmax_alpha=True), ("attn_use_entmax15", "attn_learned_entmax_alpha")),
    (dict(attn_entmax_alpha=1.3, attn_learned_entmax_alpha=True), ("attn_entmax_alpha", "attn_learned_entmax_alpha")),
    (dict(attn_shared_qk=True, attn_kv_heads=2), ("attn_shared_qk", "attn_kv_heads")),
    (dict(attn_qk_norm=True, attn_qk_norm_scale=5.0, attn_scale=0.1), ("attn_qk_norm_scale", "attn_scale")),
]


@pytest.mark.parametrize("kw, names", REFUSED, ids=lambda v: "+".join(v) if isinstance(v, tuple) else None)
def test_refused_combinations_name_both_keywords(kw, names):
    with pytest.raises(ConfigConflictError) as info:
        Decoder(dim=DIM, depth=1, heads=HEADS, **kw)
    assert all(name in str(info.value) for name in names), str(info.value)


@pytest.mark.parametrize("kw, match", [
    (dict(attn_talking_head=True), "attn_talking_heads"),
    (dict(attn_entmax_alpha=1.0), "attn_entmax_alpha"),
    (dict(attn_entmax_alpha=1.0001), "attn_entmax_alpha"),
    (dict(attn_kv_heads=3), "attn_kv_heads"),
    (dict(attn_sparse_topk=0), "attn_sparse_topk"),
    (dict(attn_qk_norm=True, attn_qk_norm_scale=0.0), "attn_qk_norm_scale"),
])
def test_bad_values_raise_at_construction(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Decoder(dim=DIM, depth=1, heads=HEADS, **kw)


# ----------------------------------------------------------------------------------------------
# every attention feature with every positional scheme, through the property harness

load_features()
ATTN_FEATURES = [n for n, f in FEATURES.items() if any(k.startswith("attn_") for k in f.layers) or "num_memory_tokens" in f.wrapper]
# one representative of each scheme (their variants run alone and in the sampled combinations)
POSITIONAL = [n for n in ("rotary", "alibi", "t5_rel_pos", "tupe_cls", "sinusoidal", "no_positions") if n in FEATURES]


def _accepted_pairs():
    """Every (attention feature, scheme) pair the library accepts; refused pairs raise
    ConfigConflictError at construction and are tested where they are refused."""
    pairs = []
    for feature in ATTN_FEATURES:
        for positional in POSITIONAL:
            case = ("decoder", (FEATURES[feature], FEATURES[positional]))
            try:
                build(*case)
            except Refused:
                continue
            except UndeclaredRefusal:
                if known_defect(defect_key("build", case)):  # listed, and asserted still failing, in harness.py
                    continue
                raise
            pairs.append((feature, positional))
    return pairs


# a sweep beyond the pairwise covering array, which has every such pair on every kind in CI (make fuzz runs it)
@pytest.mark.fuzz
@pytest.mark.parametrize("feature, positional", _accepted_pairs())
def test_each_attention_feature_with_each_positional_scheme(feature, positional):
    case = ("decoder", (FEATURES[feature], FEATURES[positional]))
    run_properties(("finite", "causal", "padding", "backends"), case)


def test_sparse_topk_keeps_near_ties_so_cached_decoding_equals_the_full_forward():
    """Without positions a repeated token has the same key; the full forward computes both copies in
    one pass (an exact tie at the k-th score, both kept), a cache computes them in two passes
    (a last-bit difference). Near-ties are kept too, so both agree (9 of 20 prompts differed by up
    to 2e-2 when only exact ties were kept)."""
    from x_transformers import TransformerWrapper
    from x_transformers.cache import KVCache

    torch.manual_seed(0)
    net = TransformerWrapper(num_tokens=29, max_seq_len=64, use_abs_pos_emb=False,
                             attn_layers=Decoder(dim=32, depth=1, heads=4, attn_sparse_topk=3)).eval()
    for seed in range(20):
        x = torch.randint(0, 29, (2, 8), generator=torch.Generator().manual_seed(seed))
        cache = KVCache()
        steps = [net(x[:, :3], cache=cache)] + [net(x[:, t:t + 1], cache=cache) for t in range(3, 8)]
        torch.testing.assert_close(torch.cat(steps, dim=1), net(x), atol=1e-5, rtol=1e-5)


def test_sparse_topk_keeps_exactly_k_in_bfloat16():
    """1912.11637 keeps the k largest scores of each query. The near-tie slack (above) is a few
    float32 rounding errors, not a few of the score dtype's: under bf16 autocast (the GPU default)
    16 bf16 epsilons of a score near 10 are 1.3, which kept every score within 1.3 of the k-th."""
    from x_transformers.attend import attend

    scores = torch.tensor([10.0, 9.5, 9.0, 8.5, 8.0, 7.0, 1.0, 0.0])
    q = torch.ones(1, 1, 1, 1, dtype=torch.bfloat16)
    k = scores.to(torch.bfloat16).view(1, 1, 8, 1)
    v = torch.eye(8, dtype=torch.bfloat16).view(1, 1, 8, 8)
    _, w = attend(q, k, v, scale=1.0, sparse_topk=2, need_weights=True)
    w = w.float().view(8)
    assert (w > 0).sum() == 2
    expected = torch.zeros(8)
    expected[:2] = torch.softmax(scores[:2], dim=0)
    torch.testing.assert_close(w, expected, atol=1e-2, rtol=0)
