"""Sampling filters (top-k, top-p, min-p, custom), greedy decoding, seeded draws."""

import pytest
import torch

from x_transformers.sampling import (FILTERS, check_filter_kwargs, filter_keywords, get_filter, min_p, sample, top_k,
                                     top_p)


def logits(b=4, v=50, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 3, 17, 50])
def test_top_k_keeps_exactly_k_largest(k):
    x = logits()
    x[0, :10] = 1.0  # ties at the k-th value still leave exactly k
    out = top_k(x, k=k)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == k).all()
    assert torch.equal(out[kept], x[kept])  # surviving logits are untouched
    # every kept logit is >= every dropped one
    lowest_kept = torch.where(kept, x, torch.inf).amin(-1)
    highest_dropped = torch.where(kept, -torch.inf, x).amax(-1)
    assert (lowest_kept >= highest_dropped).all()


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("seed", range(3))
def test_top_p_keeps_smallest_set_reaching_p(p, seed):
    x = logits(seed=seed)
    probs = x.softmax(-1)
    kept = torch.isfinite(top_p(x, p=p))
    for row in range(x.shape[0]):
        kp = probs[row][kept[row]]
        assert kp.sum() >= p - 1e-6, "kept mass must reach p"
        assert kp.sum() - kp.min() < p, "dropping the least likely kept token must fall below p: smallest set"
        if (~kept[row]).any():  # it is the most likely tokens that are kept
            assert kp.min() >= probs[row][~kept[row]].max()


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
def test_min_p_keeps_tokens_above_fraction_of_max(p):
    x = logits()
    probs = x.softmax(-1)
    kept = torch.isfinite(min_p(x, p=p))
    assert torch.equal(kept, probs >= p * probs.amax(-1, keepdim=True))
    assert kept.any(-1).all()  # the most likely token always survives


def test_temperature_zero_is_greedy_and_filters_restrict_draws():
    x = logits(b=3)
    assert torch.equal(sample(x, temperature=0.0), x.argmax(-1))
    g = torch.Generator().manual_seed(0)
    allowed = torch.isfinite(top_k(x, k=2))
    for _ in range(50):
        tok = sample(x, filter_logits_fn="top_k", filter_kwargs=dict(k=2), generator=g)
        assert allowed.gather(-1, tok[:, None]).all()


def test_custom_filter_and_unknown_name():
    def only_token_7(x):
        return torch.full_like(x, float("-inf")).index_fill(-1, torch.tensor([7]), 0.0)

    assert (sample(logits(), filter_logits_fn=only_token_7) == 7).all()
    with pytest.raises(ValueError, match="top_k"):
        get_filter("topk")
    assert set(FILTERS) >= {"top_k", "top_p", "min_p"}


def test_seeded_sampling_is_reproducible():
    x = logits(b=8, v=100)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([sample(x, filter_logits_fn="top_p", filter_kwargs=dict(p=0.95), generator=g)
                            for _ in range(10)])

    assert torch.equal(draws(1), draws(1))
    assert not torch.equal(draws(1), draws(2))


def test_each_filter_declares_its_keywords_through_its_signature():
    assert filter_keywords(FILTERS["top_k"]) == {"k", "frac", "frac_num_tokens"}  # upstream's names too
    assert filter_keywords(FILTERS["top_p"]) == {"p", "thres"}
    assert filter_keywords(FILTERS["min_p"]) == {"p", "min_p"}
    assert filter_keywords(FILTERS["top_a"]) == {"min_p_pow", "min_p_ratio"}
    assert filter_keywords(lambda x, **kw: x) is None  # takes anything


def test_filter_kwargs_typo_raises_naming_the_closest_valid_keyword():
    with pytest.raises(TypeError, match=r"top_p takes no keyword 'pp'; did you mean 'p'\? valid: \['p', 'thres'\]"):
        check_filter_kwargs("top_p", dict(pp=0.9))
    with pytest.raises(TypeError, match=r"top_k takes no keyword 'fraction'; did you mean 'frac'"):
        check_filter_kwargs("top_k", dict(fraction=0.2))

    def custom(x, *, width):
        return x

    with pytest.raises(TypeError, match=r"custom takes no keyword 'widht'; did you mean 'width'"):
        check_filter_kwargs(custom, dict(widht=2))
    check_filter_kwargs(custom, dict(width=2))
    check_filter_kwargs(lambda x, **kw: x, dict(anything=1))
    check_filter_kwargs("top_k", dict(k=3, frac=0.5))


def test_unknown_filter_name_suggests_the_closest_and_lists_all():
    with pytest.raises(ValueError, match=r"unknown logit filter 'min-p' \(did you mean 'min_p'\?\); valid: \['min_p', 'top_a', 'top_k', 'top_p'\]"):
        get_filter("min-p")


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0, "1.0"])
def test_sample_rejects_a_temperature_that_is_not_a_finite_number_at_least_zero(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        sample(logits(), temperature=temperature)
